"""`UCEHubMixin`: model cards for saved edits and fused models, and pushing edits to the Hugging Face Hub.

Kept apart from `UCEMixin` because it needs the packaged card template: the single-file community pipeline
(built from `UCEMixin` and its modules) loads and applies edits, the installed plugin also shares them.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from diffusers.utils import logging
from huggingface_hub import HfApi

from ..loaders.edit_file import EDIT_WEIGHT_NAME
from ..loaders.lora import LORA_WEIGHT_NAME
from .cards import card_for_pipeline, save_model_card

logger = logging.get_logger(__name__)


class UCEHubMixin:
    """Cards and Hub pushes for concept edits; goes before `UCEMixin` in a pipeline class's bases."""

    def save_concept_edits(
        self, save_directory: str | os.PathLike, *, weight_name: str = EDIT_WEIGHT_NAME, overwrite: bool = False,
        write_model_card: bool = True, overwrite_model_card: bool = False,
    ) -> str:
        r"""Save the applied edit as one safetensors file, plus a `README.md` model card (`base_model_relation:
        adapter`) unless the folder already has one.

        Args:
            save_directory (`str` or `os.PathLike`): folder to write into (created if needed).
            weight_name (`str`, defaults to `"uce_edits.safetensors"`): the file name; must end in `.safetensors`.
            overwrite (`bool`, defaults to `False`): replace an existing edit file of that name.
            write_model_card (`bool`, defaults to `True`): also write the model card.
            overwrite_model_card (`bool`, defaults to `False`): replace an existing `README.md`.

        Returns:
            `str`: the path of the edit file.
        """
        path = super().save_concept_edits(save_directory, weight_name=weight_name, overwrite=overwrite)
        if write_model_card:
            card = card_for_pipeline(self, "adapter", report=self._uce_state.report, weight_name=weight_name)
            save_model_card(card, save_directory, overwrite=overwrite_model_card)
        return path

    def save_concept_edits_as_lora(
        self, save_directory: str | os.PathLike, *, rank: int | None = None, weight_name: str = LORA_WEIGHT_NAME,
        overwrite: bool = False, write_model_card: bool = True, overwrite_model_card: bool = False,
    ) -> float:
        r"""Export the applied edit as a diffusers-format LoRA, plus a model card unless the folder has a README.

        Args:
            save_directory (`str` or `os.PathLike`): folder to write into (created if needed).
            rank (`int`, *optional*): the LoRA rank; exact by default.
            weight_name (`str`, defaults to `"pytorch_lora_weights.safetensors"`): the file name.
            overwrite (`bool`, defaults to `False`): replace an existing file of that name.
            write_model_card (`bool`, defaults to `True`): also write the model card.
            overwrite_model_card (`bool`, defaults to `False`): replace an existing `README.md`.

        Returns:
            `float`: the relative error of the LoRA against the exact edit (0 up to float error at exact rank).
        """
        error = super().save_concept_edits_as_lora(save_directory, rank=rank, weight_name=weight_name,
                                                   overwrite=overwrite)
        if write_model_card:
            card = card_for_pipeline(self, "adapter", report=self._uce_state.report, lora_weight_name=weight_name)
            save_model_card(card, save_directory, overwrite=overwrite_model_card)
        return error

    def save_pretrained(self, save_directory, *args, overwrite_model_card: bool = False, **kwargs):
        """`save_pretrained` that also writes the generated model card (`finetune`) of a fused edit, keeping an
        existing `README.md` unless `overwrite_model_card=True`."""
        result = super().save_pretrained(save_directory, *args, **kwargs)
        if self._uce_state is not None and not kwargs.get("push_to_hub", False):
            save_model_card(self._uce_card("finetune"), save_directory, overwrite=overwrite_model_card)
        return result

    def _upload_folder(self, working_dir, repo_id, token=None, commit_message=None, create_pr=False, subfolder=None):
        # Both `push_to_hub` and `save_pretrained(push_to_hub=True)` upload through here, after diffusers has written
        # its generic card: an edited (necessarily fused) pipeline replaces it with the generated one.
        if self._uce_state is not None and subfolder is None:
            save_model_card(self._uce_card("finetune", repo_id), working_dir, overwrite=True)
            commit_message = commit_message or "Upload concept-edited pipeline (diffusers-uce)"
        return super()._upload_folder(working_dir, repo_id, token=token, commit_message=commit_message,
                                      create_pr=create_pr, subfolder=subfolder)

    def push_concept_edits_to_hub(
        self, repo_id: str, *, private: bool | None = None, token: str | None = None,
        commit_message: str | None = None, create_pr: bool = False, weight_name: str = EDIT_WEIGHT_NAME,
    ):
        r"""Push the applied edit to the Hub in one commit: the edit file, its model card and the single-file
        community pipeline of the pipeline's family (`pipeline.py`, so `custom_pipeline=repo_id` works without the
        plugin).

        Args:
            repo_id (`str`): the repository (`"user/name"`), created if needed.
            private (`bool`, *optional*): visibility of a newly created repository.
            token (`str`, *optional*): Hub token (defaults to the logged-in one).
            commit_message (`str`, *optional*): the commit message.
            create_pr (`bool`, defaults to `False`): open a pull request instead of committing to main.
            weight_name (`str`, defaults to `"uce_edits.safetensors"`): the edit file's name in the repository.

        Returns:
            `huggingface_hub.CommitInfo`: the commit (its `pr_url` when `create_pr=True`).

        Example:
        ```py
        >>> pipe.apply_concept_edits(erase=["Van Gogh"], guide="art")
        >>> pipe.push_concept_edits_to_hub("me/sd14-no-van-gogh")
        >>> fresh.load_concept_edits("me/sd14-no-van-gogh")
        ```
        """
        from .community import HUB_PIPELINE_FILENAME, write_community_pipeline  # here: `python -m` runs community

        state = self._uce_require_state("push")
        with tempfile.TemporaryDirectory(prefix="uce-push-") as folder:
            self.save_concept_edits(folder, weight_name=weight_name, write_model_card=False)
            card = card_for_pipeline(self, "adapter", report=state.report, repo_id=repo_id, weight_name=weight_name)
            save_model_card(card, folder)
            write_community_pipeline(Path(folder) / HUB_PIPELINE_FILENAME,
                                     pipeline_base=self._uce_base_class().__name__)
            api = HfApi(token=token)
            stage = "creating the repository"
            try:
                repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
                stage = "uploading the edit"
                info = api.upload_folder(
                    repo_id=repo_id, folder_path=folder, create_pr=create_pr,
                    commit_message=commit_message or f"Add {len(state.records)} concept edit(s) (diffusers-uce)",
                )
            except Exception as error:
                logger.error(f"pushing concept edits to {repo_id} failed while {stage}: {error}. Nothing was "
                             "committed by this push; the pipeline and local files are unchanged")
                raise
        logger.info(f"Pushed concept edits to {repo_id}")
        return info

    def _uce_card(self, kind: str, repo_id: str | None = None):
        return card_for_pipeline(self, kind, report=self._uce_state.report, repo_id=repo_id)

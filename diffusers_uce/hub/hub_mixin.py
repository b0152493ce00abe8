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
from .cards import card_for_pipeline, save_model_card

logger = logging.get_logger(__name__)


def upload_folder_to_hub(folder: str | os.PathLike, repo_id: str, *, private: bool | None = None,
                         token: str | None = None, commit_message: str | None = None, create_pr: bool = False,
                         what: str = "the folder"):
    r"""Create `repo_id` if needed and upload `folder` to it in one commit.

    Returns:
        `huggingface_hub.CommitInfo`: the commit (its `pr_url` when `create_pr=True`).
    """
    api = HfApi(token=token)
    stage = "creating the repository"
    try:
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        stage = f"uploading {what}"
        return api.upload_folder(repo_id=repo_id, folder_path=os.fspath(folder), create_pr=create_pr,
                                 commit_message=commit_message)
    except Exception as error:
        logger.error(f"pushing to {repo_id} failed while {stage}: {error}. Nothing was committed by this push; the "
                     "pipeline and local files are unchanged")
        raise


class UCEHubMixin:
    """Model cards and Hub pushes for concept edits; goes before `UCEMixin` in a pipeline class's bases.

    Every save of an edit (`save_concept_edits`, `save_concept_edits_as_lora`, `save_pretrained` of a fused edit)
    calls the `_uce_write_model_card` hook, which writes the generated card here; `push_concept_edits_to_hub` shares
    an edit with its card and the community pipeline.
    """

    def _uce_write_model_card(self, save_directory, kind: str, *, overwrite: bool = False, **card) -> None:
        card = card_for_pipeline(self, kind, report=self.concept_edit_report, **card)
        save_model_card(card, save_directory, overwrite=overwrite)

    def _upload_folder(self, working_dir, repo_id, token=None, commit_message=None, create_pr=False, subfolder=None):
        # Both `push_to_hub` and `save_pretrained(push_to_hub=True)` upload through here, after diffusers has written
        # its generic card: an edited (necessarily fused) pipeline replaces it with the generated one.
        if self.concept_edits and subfolder is None:
            self._uce_write_model_card(working_dir, "finetune", overwrite=True, repo_id=repo_id)
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
            self._uce_write_model_card(folder, "adapter", repo_id=repo_id, weight_name=weight_name)
            write_community_pipeline(Path(folder) / HUB_PIPELINE_FILENAME,
                                     pipeline_base=self._uce_base_class().__name__)
            info = upload_folder_to_hub(
                folder, repo_id, private=private, token=token, create_pr=create_pr,
                commit_message=commit_message or f"Add {len(state.records)} concept edit(s) (diffusers-uce)",
                what="the edit",
            )
        logger.info(f"Pushed concept edits to {repo_id}")
        return info

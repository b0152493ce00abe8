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
from huggingface_hub.errors import HfHubHTTPError

from ..loaders.edit_format import EDIT_WEIGHT_NAME
from ..loaders.state_mixin import serialized
from .cards import card_for_pipeline, save_model_card

logger = logging.get_logger(__name__)


def _create_repo(api: HfApi, repo_id: str, private: bool | None) -> tuple[str, bool]:
    """Create `repo_id` unless it exists; returns its full id and whether this call created it."""
    try:
        return api.create_repo(repo_id, private=private).repo_id, True
    except HfHubHTTPError as error:
        if error.response is None or error.response.status_code != 409:
            raise
        return api.create_repo(repo_id, private=private, exist_ok=True).repo_id, False


def _keeps_remote_card(api: HfApi, repo_id: str, created: bool, overwrite_model_card: bool) -> bool:
    """Whether a README.md already in the repository must be kept (it is, unless `overwrite_model_card`)."""
    if created or overwrite_model_card or not api.file_exists(repo_id, "README.md"):
        return False
    logger.warning(f"kept the README.md already in {repo_id}; pass overwrite_model_card=True to replace it with the "
                   "generated model card")
    return True


def _failed(api: HfApi, repo_id: str, created: bool, stage: str, error: Exception) -> None:
    """Say what a failed push left behind: the repository it created is deleted again."""
    left = "Nothing was committed by this push"
    if created:
        try:
            api.delete_repo(repo_id)
            left += f"; the repository {repo_id} it had created was deleted again"
        except Exception as cleanup:  # noqa: BLE001 - reported, the original error is raised
            left += f"; the repository {repo_id} it created still exists, empty ({cleanup}): delete it or push again"
    logger.error(f"pushing to {repo_id} failed while {stage}: {error}. {left}; the pipeline and local files are "
                 "unchanged")


def upload_folder_to_hub(folder: str | os.PathLike, repo_id: str, *, private: bool | None = None,
                         token: str | None = None, commit_message: str | None = None, create_pr: bool = False,
                         overwrite_model_card: bool = False, what: str = "the folder"):
    r"""Create `repo_id` if needed and upload `folder` to it in one commit.

    A `README.md` already in the repository is kept unless `overwrite_model_card=True`. If the upload fails, a
    repository this call created is deleted again, so a failed push leaves nothing behind.

    Returns:
        `huggingface_hub.CommitInfo`: the commit (its `pr_url` when `create_pr=True`).
    """
    api = HfApi(token=token)
    stage, created = "creating the repository", False
    try:
        repo_id, created = _create_repo(api, repo_id, private)
        stage = f"uploading {what}"
        keep = _keeps_remote_card(api, repo_id, created, overwrite_model_card)
        return api.upload_folder(repo_id=repo_id, folder_path=os.fspath(folder), create_pr=create_pr,
                                 commit_message=commit_message, ignore_patterns=["README.md"] if keep else None)
    except Exception as error:
        _failed(api, repo_id, created, stage, error)
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
        # its generic card: an edited (necessarily fused) pipeline replaces it with the generated one, unless the
        # repository has a README.md already and the push did not ask to overwrite it.
        if self.concept_edits and subfolder is None:
            api = HfApi(token=token)
            if _keeps_remote_card(api, repo_id, False, getattr(self, "_uce_overwrite_model_card", False)):
                Path(working_dir, "README.md").unlink(missing_ok=True)  # diffusers' copy of the remote card
            else:
                self._uce_write_model_card(working_dir, "finetune", overwrite=True, repo_id=repo_id)
            commit_message = commit_message or "Upload concept-edited pipeline (diffusers-uce)"
        try:
            return super()._upload_folder(working_dir, repo_id, token=token, commit_message=commit_message,
                                          create_pr=create_pr, subfolder=subfolder)
        except Exception as error:
            logger.error(f"pushing to {repo_id} failed while uploading the pipeline: {error}. Nothing was committed "
                         f"by this push; the repository {repo_id} exists (created by it if it was not there before)")
            raise

    @serialized
    def push_concept_edits_to_hub(
        self, repo_id: str, *, private: bool | None = None, token: str | None = None,
        commit_message: str | None = None, create_pr: bool = False, weight_name: str = EDIT_WEIGHT_NAME,
        overwrite_model_card: bool = False,
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
            overwrite_model_card (`bool`, defaults to `False`): replace a `README.md` already in the repository
                (it is kept otherwise).

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
                what="the edit", overwrite_model_card=overwrite_model_card,
            )
        logger.info(f"Pushed concept edits to {repo_id}")
        return info

"""`UCEHubMixin`: model cards for saved edits and fused models, and pushing edits to the Hugging Face Hub.

Kept apart from `UCEMixin` because it needs the packaged card template: the single-file community pipeline
(built from `UCEMixin` and its modules) loads and applies edits, the installed plugin also shares them.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import replace
from pathlib import Path

from diffusers.utils import logging
from huggingface_hub import CommitOperationAdd, HfApi
from huggingface_hub.errors import HfHubHTTPError

from ..loaders.edit_format import EDIT_WEIGHT_NAME
from ..loaders.state_mixin import serialized
from ..utils.checks import check_base_model, check_license
from .card_files import card_for_folder, folder_files
from .cards import REPORT_PLOT_NAME, card_for_pipeline, is_generated_card, save_model_card

logger = logging.get_logger(__name__)



def _create_repo(api: HfApi, repo_id: str, private: bool | None) -> tuple[str, bool]:
    """Create `repo_id` unless it exists; returns its full id and whether this call created it."""
    try:
        return api.create_repo(repo_id, private=private).repo_id, True
    except HfHubHTTPError as error:
        if error.response is None or error.response.status_code != 409:
            raise
        return api.create_repo(repo_id, private=private, exist_ok=True).repo_id, False


def _keeps_remote_card(api: HfApi, repo_id: str, created: bool, overwrite_model_card: bool,
                       revision: str | None = None) -> bool:
    """Whether a README.md already in the repository (at `revision`) must be kept: it is, unless
    `overwrite_model_card` or it is a card diffusers-uce wrote and nobody edited since (which the push replaces with
    the card of what it uploads)."""
    if created or overwrite_model_card or not api.file_exists(repo_id, "README.md", revision=revision):
        return False
    with open(api.hf_hub_download(repo_id, "README.md", revision=revision), encoding="utf-8",
              errors="replace") as f:
        if is_generated_card(f.read()):
            logger.info(f"replacing the model card diffusers-uce wrote in {repo_id} with the card of this push")
            return False
    logger.warning(f"kept the README.md already in {repo_id}; pass overwrite_model_card=True to replace it with the "
                   "generated model card")
    return True


def _commit_checked(api: HfApi, repo_id: str, folder, readme: str | None, *, created: bool,
                    overwrite_model_card: bool, commit_message: str, create_pr: bool):
    """Commit `folder` on top of the revision whose README.md was checked (`parent_commit`): a README.md another
    writer commits between the check and the commit makes the Hub refuse the commit (412) instead of being
    overwritten; the README.md is then checked again and the commit retried once."""
    for attempt in range(2):
        head = api.repo_info(repo_id).sha
        keep = _keeps_remote_card(api, repo_id, created and attempt == 0, overwrite_model_card, revision=head)
        try:
            return api.create_commit(repo_id=repo_id, operations=_folder_operations(folder, readme, keep),
                                     commit_message=commit_message, create_pr=create_pr, parent_commit=head)
        except HfHubHTTPError as error:
            if attempt or error.response is None or error.response.status_code != 412:
                raise
            logger.warning(f"{repo_id} changed while this push checked its README.md (another commit came first): "
                           "checking it again")


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


def _folder_operations(folder: str | os.PathLike, readme: str | None, keep_readme: bool) -> list[CommitOperationAdd]:
    """Every file of `folder` as a commit operation, with `readme` as the README.md when given, and no README.md
    when the repository's own must be kept."""
    folder = Path(folder)
    operations = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = path.relative_to(folder).as_posix()
        skipped = name == "README.md" and (readme is not None or keep_readme)
        # git data and the Hub client's cache are left out, as `upload_folder` leaves them out
        if not skipped and ".git" not in path.relative_to(folder).parts and ".cache/huggingface/" not in name:
            operations.append(CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path)))
    if readme is not None and not keep_readme:
        operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=readme.encode("utf-8")))
    return operations


def _push_folder(folder, repo_id: str, readme: str | None, *, private: bool | None, token: str | None,
                 commit_message: str | None, create_pr: bool, overwrite_model_card: bool, what: str):
    """Create `repo_id` if needed and commit `folder` to it (with `readme` as its README.md when given)."""
    api = HfApi(token=token)
    stage, created = "creating the repository", False
    try:
        repo_id, created = _create_repo(api, repo_id, private)
        stage = f"uploading {what}"
        return _commit_checked(api, repo_id, folder, readme, created=created,
                               overwrite_model_card=overwrite_model_card,
                               commit_message=commit_message or f"Upload {what} (diffusers-uce)", create_pr=create_pr)
    except Exception as error:
        _failed(api, repo_id, created, stage, error)
        raise


def upload_folder_to_hub(folder: str | os.PathLike, repo_id: str, *, private: bool | None = None,
                         token: str | None = None, commit_message: str | None = None, create_pr: bool = False,
                         overwrite_model_card: bool = False, base_model: str | None = None,
                         license: str | None = None, what: str = "the folder"):
    r"""Create `repo_id` if needed and upload `folder` to it in one commit.

    The folder's model card, if diffusers-uce wrote it (and nobody edited it since), is written again for `repo_id`
    (`card_for_folder`): its snippets name the repository instead of a placeholder, and load only files the folder
    holds. A README.md you wrote is uploaded as it is. A `README.md` already in the repository is kept unless
    `overwrite_model_card=True` (or it is a card diffusers-uce wrote). If the upload fails, a repository this call
    created is deleted again, so a failed push leaves nothing behind.

    Args:
        folder (`str` or `os.PathLike`): a folder written by `save_concept_edits`, `save_concept_edits_as_lora` or
            `save_pretrained`.
        repo_id (`str`): the repository (`"user/name"`), created if needed.
        base_model (`str`, *optional*): the base model's Hub id for the card's metadata (`"owner/name"`), when the
            edit was made on a model loaded from a local folder.
        license (`str`, *optional*): the licence id for the card's metadata.

    Returns:
        `huggingface_hub.CommitInfo`: the commit (its `pr_url` when `create_pr=True`).
    """
    check_base_model(base_model)
    check_license(license)
    readme = card_for_folder(folder, repo_id, base_model=base_model, license=license)
    return _push_folder(folder, repo_id, readme, private=private, token=token, commit_message=commit_message,
                        create_pr=create_pr, overwrite_model_card=overwrite_model_card, what=what)


class UCEHubMixin:
    """Model cards and Hub pushes for concept edits; goes before `UCEMixin` in a pipeline class's bases.

    Every save of an edit (`save_concept_edits`, `save_concept_edits_as_lora`, `save_pretrained` of a fused edit)
    calls the `_uce_write_model_card` hook, which writes the generated card here; `push_concept_edits_to_hub` shares
    an edit with its card, its exact LoRA and the community pipeline.
    """

    def _uce_write_model_card(self, save_directory, kind: str, *, overwrite: bool = False, no_lora: str | None = None,
                              **card) -> None:
        if kind == "adapter":  # the files of this edit the folder holds, each with its loading snippet
            edits = [r.to_dict() for r in self.concept_edits]
            files, _ = folder_files(save_directory, edits, self.concept_edit_scale)
            card["files"] = replace(files, no_lora=no_lora)
        if os.path.isfile(os.path.join(save_directory, REPORT_PLOT_NAME)):  # the report's picture, next to the card
            card.setdefault("report_plot", REPORT_PLOT_NAME)
        card = card_for_pipeline(self, kind, report=self.concept_edit_report, **card)
        save_model_card(card, save_directory, overwrite=overwrite)

    def _upload_folder(self, working_dir, repo_id, token=None, commit_message=None, create_pr=False, subfolder=None):
        # Both `push_to_hub` and `save_pretrained(push_to_hub=True)` upload through here, after diffusers has written
        # its generic card: an edited (necessarily fused) pipeline replaces it with the generated one, unless the
        # repository has a README.md of its own and the push did not ask to overwrite it.
        try:
            if not (self.concept_edits and subfolder is None):
                return super()._upload_folder(working_dir, repo_id, token=token, commit_message=commit_message,
                                              create_pr=create_pr, subfolder=subfolder)
            options = dict(getattr(self, "_uce_push_card", {}))
            overwrite = options.pop("overwrite", False)
            # the generated card replaces diffusers' copy of the remote one; it is left out of the commit when the
            # repository's README.md must be kept (checked at the revision the commit is made on)
            self._uce_write_model_card(working_dir, "finetune", overwrite=True, repo_id=repo_id, **options)
            message = commit_message or "Upload concept-edited pipeline (diffusers-uce)"
            return _commit_checked(HfApi(token=token), repo_id, working_dir, None, created=False,
                                   overwrite_model_card=overwrite, commit_message=message, create_pr=create_pr)
        except Exception as error:
            logger.error(f"pushing to {repo_id} failed while uploading the pipeline: {error}. Nothing was committed "
                         f"by this push; the repository {repo_id} exists (created by it if it was not there before)")
            raise

    @serialized
    def push_concept_edits_to_hub(
        self, repo_id: str, *, private: bool | None = None, token: str | None = None,
        commit_message: str | None = None, create_pr: bool = False, weight_name: str = EDIT_WEIGHT_NAME,
        overwrite_model_card: bool = False, base_model: str | None = None, license: str | None = None,
    ):
        r"""Push the applied edit to the Hub in one commit: the edit file, the same edit as an exact LoRA in the
        diffusers format (`pytorch_lora_weights.safetensors`, which plain diffusers' `load_lora_weights` loads), the
        single-file community pipeline of the pipeline's family (`pipeline.py`, so `custom_pipeline=repo_id` works
        without installing the plugin) and a model card that says which file is which.

        An edit the LoRA export cannot write (one that changes no weight, as at strength 0) is pushed without the
        LoRA, and the card says so.

        Args:
            repo_id (`str`): the repository (`"user/name"`), created if needed.
            private (`bool`, *optional*): visibility of a newly created repository.
            token (`str`, *optional*): Hub token (defaults to the logged-in one).
            commit_message (`str`, *optional*): the commit message.
            create_pr (`bool`, defaults to `False`): open a pull request instead of committing to main.
            weight_name (`str`, defaults to `"uce_edits.safetensors"`): the edit file's name in the repository.
            overwrite_model_card (`bool`, defaults to `False`): replace a `README.md` already in the repository (it
                is kept otherwise, unless it is a card diffusers-uce wrote and nobody edited since).
            base_model (`str`, *optional*): the base model's Hub id (`"owner/name"`) for the card's metadata, when
                the pipeline was loaded from a local folder; by default its `name_or_path` when that is a Hub id.
            license (`str`, *optional*): the licence id for the card's metadata; by default the base model's when it
                is a well-known model.

        Returns:
            `huggingface_hub.CommitInfo`: the commit (its `pr_url` when `create_pr=True`).

        Example:
        ```py
        >>> pipe.apply_concept_edits(erase=["Van Gogh"], guide="art")
        >>> pipe.push_concept_edits_to_hub("me/sd14-no-van-gogh")
        >>> fresh.load_concept_edits("me/sd14-no-van-gogh")  # with the plugin
        >>> plain.load_lora_weights("me/sd14-no-van-gogh", weight_name="pytorch_lora_weights.safetensors")  # without
        ```
        """
        from .community import HUB_PIPELINE_FILENAME, write_community_pipeline  # here: `python -m` runs community

        card = {"base_model": check_base_model(base_model), "license": check_license(license)}
        state = self._uce_require_state("push")
        with tempfile.TemporaryDirectory(prefix="uce-push-") as folder:
            self.save_concept_edits(folder, weight_name=weight_name, write_model_card=False)
            try:  # exact rank, diffusers format: the file `load_lora_weights(repo_id)` looks for
                self.save_concept_edits_as_lora(folder, write_model_card=False)
            except ValueError as error:
                card["no_lora"] = (f"the LoRA export cannot write this edit ({error}). Load the edit file with the "
                                   "plugin.")
                logger.warning(f"pushing the edit without a LoRA export: {error}")
            write_community_pipeline(Path(folder) / HUB_PIPELINE_FILENAME,
                                     pipeline_base=self._uce_base_class().__name__)
            self._uce_write_model_card(folder, "adapter", repo_id=repo_id, **card)
            info = _push_folder(
                folder, repo_id, None, private=private, token=token, create_pr=create_pr,
                commit_message=commit_message or f"Add {len(state.records)} concept edit(s) (diffusers-uce)",
                what="the edit", overwrite_model_card=overwrite_model_card,
            )
        logger.info(f"Pushed concept edits to {repo_id}")
        return info

"""What a folder of a concept edit holds, read back for its model card: the edit file and the LoRA exports in it
(each with the edit records it was saved with), and the card a push of the folder uploads.

A card offers a loading snippet only for a file the folder holds. A push names the repository in its snippets:
`card_for_folder` writes the card again from the folder's files (the records, report and base model they store),
or puts the repository in place of the placeholder of a card it cannot write again (a fused pipeline's). It never
rewrites a README.md that diffusers-uce did not write or that was edited since (`cards.is_generated_card`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from diffusers.utils import logging
from huggingface_hub import ModelCard

from ..loaders.edit_format import EDIT_WEIGHT_NAME, METADATA_KEY
from ..loaders.lora_kohya import LORA_RECORD_KEY
from .card_tables import edit_options_line
from .cards import (
    KNOWN_BASE_LICENSES,
    REPO_PLACEHOLDER,
    CardFiles,
    LoraFile,
    _family,
    card_metadata,
    hub_model_id,
    is_generated_card,
    render_model_card,
    sign_card,
)
from .community import HUB_PIPELINE_FILENAME

logger = logging.get_logger(__name__)



@dataclass
class SavedEdit:
    """What one file of an edit records about it: an edit file (`lora` is `None`) or a LoRA export.

    Args:
        name (`str`): the file name.
        edits (`list[dict]`): the edit records.
        scale (`float`, *optional*): the strength it was saved at.
        info (`dict`): the rest of its record (`family`, `base_model`, `edit_keys`, `layers`, `report`), as stored;
            LoRA files written before these were recorded lack them.
        lora (`LoraFile`, *optional*): for a LoRA export, its format, rank and error.
    """

    name: str
    edits: list[dict]
    scale: float | None
    info: dict = field(default_factory=dict)
    lora: LoraFile | None = None

    def same_edit(self, edits: list[dict], scale: float | None) -> bool:
        """Whether this file holds the edit of these records at this strength."""
        return _canonical(self.edits) == _canonical(edits) and self.scale == scale


def _canonical(value) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def read_saved_edit(path: str | os.PathLike) -> SavedEdit | None:
    """The record of an edit file or of a LoRA written by diffusers-uce, from its header only; `None` for any other
    file (another tool's LoRA, a file that cannot be read)."""
    import safetensors

    path = Path(path)
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            header, keys = f.metadata() or {}, list(f.keys())
        if METADATA_KEY in header:
            info, lora = json.loads(header[METADATA_KEY]), None
        elif LORA_RECORD_KEY in header:
            info = json.loads(header[LORA_RECORD_KEY])
            if not _edits_text_layers_only(keys):
                logger.warning(f"{path} says it is a LoRA export of diffusers-uce, but it changes layers a concept "
                               "edit never changes: its record is not used for a model card")
                return None
            lora = LoraFile(path.name, "kohya" if "ss_network_module" in header else "diffusers", info.get("rank"),
                            info.get("relative_error"))
        else:
            return None
        return SavedEdit(path.name, list(info["edits"]), info.get("scale"), info, lora)
    except Exception as error:  # not a readable safetensors file of ours: not described
        logger.debug(f"{path} is not a readable edit or LoRA file of diffusers-uce: {error}")
        return None


# What the layers a concept edit changes are called in the keys of its LoRA exports (diffusers and kohya names).
_TEXT_LAYERS = ("attn2.to_k.", "attn2.to_v.", "attn2_to_k.", "attn2_to_v.", "context_embedder.",
                "text_embedder.linear_1.", "text_embedder_linear_1.")


def _edits_text_layers_only(keys) -> bool:
    """Whether every LoRA factor of a file is on a layer that reads the text embeddings (what an export of a concept
    edit holds; a relabelled LoRA trained on other layers is not)."""
    factors = [k for k in keys if ".lora_" in k or k.endswith(".alpha")]
    return bool(factors) and all(any(layer in k for layer in _TEXT_LAYERS) for k in factors)


# Said in a card written from a LoRA's record alone: nothing checked that the LoRA's weights perform those edits.
UNVERIFIED_LORA_NOTE = (
    "**Unverified:** the edits listed above are what the header of the LoRA file `{name}` says; without an edit "
    "file (which `load_concept_edits` checks against its records) and without the base model, they could not be "
    "checked against the LoRA's weights. Treat them as the uploader's description.")


def folder_files(folder: str | os.PathLike, edits: list[dict] | None = None,
                 scale: float | None = None) -> tuple[CardFiles, SavedEdit | None]:
    """The files of one edit in `folder`, for its card, and the record the card is written from.

    Args:
        folder (`str` or `os.PathLike`): the folder.
        edits (`list[dict]`, *optional*): the records of the edit to describe, with its strength `scale`; by default
            the edit of the folder's edit file (`uce_edits.safetensors` first), or of its first LoRA.
        scale (`float`, *optional*): see `edits`.

    Returns:
        `tuple[CardFiles, SavedEdit | None]`: the edit file, the LoRA exports of the same edit and whether the
        community pipeline is there; and the record (of the edit file if there is one), `None` when the folder holds
        no file of that edit. Files of another edit are left out of the card (and logged).
    """
    folder = Path(folder)
    names = sorted((p.name for p in folder.glob("*.safetensors") if p.is_file()),
                   key=lambda name: (name != EDIT_WEIGHT_NAME, name))
    saved = [s for s in map(read_saved_edit, (folder / n for n in names)) if s is not None]
    if edits is None and saved:
        reference = next((s for s in saved if s.lora is None), saved[0])
        edits, scale = reference.edits, reference.scale
    ours = [s for s in saved if s.same_edit(edits, scale)] if edits is not None else []
    for other in (s for s in saved if s not in ours):
        logger.info(f"{folder / other.name} holds another edit than the card describes: the card leaves it out")
    edit_file = next((s for s in ours if s.lora is None), None)
    files = CardFiles(edit_file=edit_file.name if edit_file else None, loras=tuple(s.lora for s in ours if s.lora),
                      community_pipeline=(folder / HUB_PIPELINE_FILENAME).is_file())
    return files, edit_file or (ours[0] if ours else None)


def card_for_folder(folder: str | os.PathLike, repo_id: str, *, base_model: str | None = None,
                    license: str | None = None) -> str | None:
    r"""The README.md a push of `folder` to `repo_id` uploads, or `None` to upload the folder's own as it is.

    A card diffusers-uce wrote (unchanged since) is written again for `repo_id`: from the records of the folder's
    edit file or LoRA (with a loading snippet for each file the folder holds), or, for a fused pipeline, by putting
    `repo_id` in place of the placeholder. A folder with no README.md gets a card when it holds an edit or LoRA file
    of diffusers-uce. A README.md someone wrote or edited is returned as `None`: it is uploaded as it is.

    Args:
        folder (`str` or `os.PathLike`): a folder written by `save_concept_edits`, `save_concept_edits_as_lora` or
            `save_pretrained` (or `diffusers-uce edit --save-edits/--lora/--output`).
        repo_id (`str`): the repository the folder goes to.
        base_model (`str`, *optional*): the base model's Hub id, for a base model loaded from a local folder; by
            default the one the card or the files name.
        license (`str`, *optional*): the licence id; by default the card's, or the base model's.

    Returns:
        `str` or `None`: the README.md text.
    """
    readme = Path(folder) / "README.md"
    text = readme.read_text(encoding="utf-8") if readme.is_file() else None
    if text is not None and not is_generated_card(text):
        if base_model or license:
            logger.warning(f"{readme} was not written by diffusers-uce (or was edited since): it is uploaded as it "
                           "is, without the base model or licence given")
        return None
    parsed = ModelCard(text) if text is not None else None
    old = parsed.data if parsed is not None else None
    license = license or _explicit_license(old)
    if (Path(folder) / "model_index.json").is_file():
        return None if parsed is None else _retarget(parsed, repo_id, "finetune", base_model, license)
    files, saved = folder_files(folder)
    if saved is None:
        return None if parsed is None else _retarget(parsed, repo_id, "adapter", base_model, license)
    info = saved.info
    stored_base = (info.get("base_model") or {}).get("name_or_path")
    family = _family(info.get("family") or "stable-diffusion")
    options = None
    if "edit_keys" in info and saved.scale is not None:
        options = edit_options_line({"groups": family.groups, "layers": info.get("layers"),
                                     "edit_keys": info["edit_keys"], "scale": saved.scale})
    if saved.lora is not None:  # the records come from a LoRA's header: nothing here can check them
        note = UNVERIFIED_LORA_NOTE.format(name=saved.name)
        options = f"{options}\n\n{note}" if options else note
    card = render_model_card(
        edits=saved.edits, base_model=base_model or getattr(old, "base_model", None) or stored_base, kind="adapter",
        report=info.get("report"), license=license, family=family, repo_id=repo_id, files=files,
        edit_options=options,
    )
    return str(card)


def _explicit_license(data) -> str | None:
    """The licence a card's metadata gives when it is not just its base model's well-known one (so it was given)."""
    license = getattr(data, "license", None)
    known = KNOWN_BASE_LICENSES.get(getattr(data, "base_model", None) or "", {}).get("license")
    return license if license and license != known else None


def _retarget(card: ModelCard, repo_id: str, kind: str, base_model: str | None, license: str | None) -> str:
    """A generated card that cannot be written again, with `repo_id` in place of the placeholder and the metadata of
    `base_model` and `license` when given (`card` is changed in place)."""
    card.text = card.text.replace(REPO_PLACEHOLDER, repo_id)
    if base_model or license:
        hub_id = base_model or hub_model_id(card.data.base_model)
        for key in ("license", "license_name", "license_link"):
            setattr(card.data, key, None)
        for key, value in card_metadata(hub_id, kind, license).items():
            setattr(card.data, key, value)
    return sign_card(str(card))

"""Model cards for concept edits: Hub metadata, what was edited, the edit report, which file is which and how to
load each, and the citation.

The Jinja template lives in the top-level `model_cards/` folder, which setup.cfg ships as the
`diffusers_uce.model_cards` package; it is found with `importlib.resources`, so installed wheels have it too. Every
card ends with a marker holding a hash of its text: `is_generated_card` tells a card diffusers-uce wrote, unchanged
since, from a README.md someone wrote or edited, which is never rewritten.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Mapping

from diffusers.utils import logging
from huggingface_hub import ModelCard, ModelCardData

from ..core.edits import ConceptEdit
from ..core.families import FAMILIES, Family, family_of
from ..loaders.edit_format import EDIT_WEIGHT_NAME
from ..utils.checks import HUB_REPO_ID
from ..utils.files import write_text_atomic
from .card_tables import edit_options_line, edit_row, erased_concepts, names, report_view

logger = logging.get_logger(__name__)

TEMPLATE_PACKAGE = "diffusers_uce.model_cards"
DEFAULT_TEMPLATE = "uce_card.md.jinja"
CARD_KINDS = ("adapter", "finetune")
PAPER_URL = "https://arxiv.org/abs/2308.14761"
# What a card shows where the repository is not known yet (a local save); a push puts the repository there.
REPO_PLACEHOLDER = "<your-username>/<your-repo>"
_MARKER = re.compile(r"^<!-- written by diffusers-uce; sha256 of this card without this line: ([0-9a-f]{64}) -->$",
                     re.MULTILINE)

_OPENRAIL_M = {"license": "creativeml-openrail-m"}
_OPENRAIL_PP = {"license": "openrail++"}
# Licences of well-known base models: a derivative carries its base model's licence (and its use restrictions).
KNOWN_BASE_LICENSES: dict[str, dict[str, str]] = {
    "CompVis/stable-diffusion-v1-4": _OPENRAIL_M,
    "runwayml/stable-diffusion-v1-5": _OPENRAIL_M,
    "stable-diffusion-v1-5/stable-diffusion-v1-5": _OPENRAIL_M,
    "stabilityai/stable-diffusion-2": _OPENRAIL_PP,
    "stabilityai/stable-diffusion-2-base": _OPENRAIL_PP,
    "stabilityai/stable-diffusion-2-1": _OPENRAIL_PP,
    "stabilityai/stable-diffusion-2-1-base": _OPENRAIL_PP,
    "stabilityai/stable-diffusion-xl-base-1.0": _OPENRAIL_PP,
    "black-forest-labs/FLUX.1-dev": {
        "license": "other",
        "license_name": "flux-1-dev-non-commercial-license",
        "license_link": "https://huggingface.co/black-forest-labs/FLUX.1-dev/blob/main/LICENSE.md",
    },
    "black-forest-labs/FLUX.1-schnell": {"license": "apache-2.0"},
}

# dtype of the card's loading snippets, by family name: FLUX in bfloat16, as diffusers' FLUX examples load it.
SNIPPET_DTYPES = {"flux": "bfloat16"}
_HUB_CACHE_DIR = re.compile(r"models--([\w.-]+?)--([\w.-]+)")


@dataclass(frozen=True)
class LoraFile:
    """A LoRA export of the edit that a card describes.

    Args:
        name (`str`): its file name.
        format (`str`, defaults to `"diffusers"`): `"diffusers"` or `"kohya"` (AUTOMATIC1111, ComfyUI).
        rank (`int`, *optional*): the rank it was limited to; `None` for the exact rank.
        relative_error (`float`, *optional*): its relative error on the weight change.
    """

    name: str
    format: str = "diffusers"
    rank: int | None = None
    relative_error: float | None = None

    def view(self) -> dict:
        """What the template shows of it."""
        exact = self.rank is None or (self.relative_error is not None and self.relative_error < 1e-6)
        error = f"{self.relative_error:.2g}" if self.relative_error is not None else "unknown"
        return {"name": self.name, "format": self.format, "stem": self.name.removesuffix(".safetensors"),
                "exact": exact, "rank": self.rank, "error": error,
                "fidelity": "exact: the edited weights" if exact else f"rank {self.rank}, relative error {error}"}


@dataclass(frozen=True)
class CardFiles:
    """The files of the edit a folder or repository holds: a card gives loading snippets for these only.

    Args:
        edit_file (`str`, *optional*): the edit file's name (`load_concept_edits`, with the plugin).
        loras (`tuple[LoraFile, ...]`, defaults to `()`): LoRA exports of the same edit (`load_lora_weights`).
        community_pipeline (`bool`, defaults to `False`): the repository holds the community pipeline `pipeline.py`.
        no_lora (`str`, *optional*): why there is no LoRA export, said in the card.
    """

    edit_file: str | None = None
    loras: tuple[LoraFile, ...] = ()
    community_pipeline: bool = False
    no_lora: str | None = None


@contextmanager
def template_path(name: str = DEFAULT_TEMPLATE) -> Iterator[Path]:
    """The file system path of a card template of the `diffusers_uce.model_cards` package, as a context manager (in
    a source checkout, its `model_cards/` folder).

    Args:
        name (`str`, defaults to `"uce_card.md.jinja"`): the template's file name.

    Example:
    ```py
    >>> with template_path() as path:
    ...     print(path.read_text()[:3])
    ---
    ```
    """
    # A source checkout reads its own `model_cards/` folder, beside the package: an editable install of another
    # checkout may map `diffusers_uce.model_cards` there. An installed package has no such folder.
    resource = Path(__file__).resolve().parents[2] / "model_cards" / name
    if not resource.is_file():
        try:
            resource = importlib.resources.files(TEMPLATE_PACKAGE).joinpath(name)
        except ModuleNotFoundError:
            raise FileNotFoundError(f"model card template {name!r} not found: {TEMPLATE_PACKAGE} is not importable; "
                                    "reinstall diffusers-uce") from None
    if not resource.is_file():
        raise FileNotFoundError(f"model card template {name!r} not found in {TEMPLATE_PACKAGE}; reinstall "
                                "diffusers-uce")
    with importlib.resources.as_file(resource) as path:
        yield Path(path)


def hub_model_id(name_or_path: str | os.PathLike | None) -> str | None:
    """The Hub model id a base model name or path stands for, or `None` (a local path that is not a Hub snapshot).

    Args:
        name_or_path (`str` or `os.PathLike`, *optional*): e.g. `"CompVis/stable-diffusion-v1-4"`, or a snapshot folder
            of the Hub cache (`.../models--CompVis--stable-diffusion-v1-4/snapshots/<sha>`).
    """
    if not name_or_path:
        return None
    text = str(name_or_path)
    if HUB_REPO_ID.match(text) and not os.path.exists(text):
        return text
    match = _HUB_CACHE_DIR.search(text.replace("\\", "/"))
    return f"{match.group(1)}/{match.group(2)}" if match else None


def _family(family: str | Family) -> Family:
    """A `Family` from its name (`"stable-diffusion"`, `"stable-diffusion-xl"`, `"flux"`), or the family itself
    (also a community pipeline's own copy of the class)."""
    if not isinstance(family, str):
        return family
    found = next((f for f in FAMILIES if f.name == family), None)
    if found is None:
        raise ValueError(f"unknown pipeline family {family!r}; use one of {', '.join(f.name for f in FAMILIES)}")
    return found


def _edited_layers(family: Family) -> str:
    """What an edit of `family` rewrites, for the card's description."""
    if family.has_keys:
        return "the cross-attention key/value projections"
    names = ", ".join(f"`{g.component}.{m}`" for g in family.groups for m in g.modules)
    return f"the projections of the text embeddings ({names})"


def _holds(files: CardFiles) -> str:
    """The description's sentence on what an adapter repository holds."""
    if files.edit_file:
        also = " It also holds the edit as a LoRA, which plain diffusers loads." if files.loras else ""
        return ("This repository holds the edit, not a full model: apply it to the base model, where it can be "
                f"scaled, fused or unloaded.{also}")
    elsewhere = ", or in AUTOMATIC1111 and ComfyUI" if any(f.format == "kohya" for f in files.loras) else ""
    return ("This repository holds the edit as a LoRA, not a full model: load it onto the base model with diffusers' "
            f"`load_lora_weights`{elsewhere}.")


def _texts(base_model: str | None, hub_id: str | None, kind: str, edits: list[dict], family: Family,
           files: CardFiles) -> tuple[str, str]:
    """The card's title and description paragraph."""
    erased = erased_concepts(edits)
    preserves = any(e.get("preserve") for e in edits)
    short = (hub_id or base_model or "").rstrip("/\\").replace("\\", "/").split("/")[-1]
    title = (f"{short}: " if short else "") + (f"{names(erased)} erased with UCE" if erased else "")
    title = title.rstrip(": ") or "Concept edit made with UCE"
    base = f"[`{hub_id}`](https://huggingface.co/{hub_id})" if hub_id else (f"`{base_model}`" if base_model else None)
    uce = f"Unified Concept Editing (UCE; [Gandikota et al., WACV 2024]({PAPER_URL}))"
    change = f"a closed-form rewrite of {_edited_layers(family)}"
    what = (f" that erases {len(erased)} concept{'s' * (len(erased) != 1)} ({names(erased, 5)}) toward "
            f"{'its guide' if len(erased) == 1 else 'their guides'}" if erased else "")
    what += ", preserving the concepts listed below" if preserves else ""
    if kind == "finetune":
        text = (f"{base or 'A text-to-image model'} with a concept edit fused into its weights: {change} made with "
                f"{uce}{what}. It loads as a plain diffusers pipeline.")
    else:
        text = f"A concept edit for {base or 'a text-to-image model'} made with {uce}: {change}{what}. {_holds(files)}"
    return title, text


def card_metadata(hub_id: str | None, kind: str, license: str | None = None) -> dict:
    """The card metadata that follows from the base model: `base_model`, `base_model_relation` (`kind`) and the
    licence (`license`, else the base model's when it is a well-known model)."""
    licence = {"license": license} if license else dict(KNOWN_BASE_LICENSES.get(hub_id or "", {}))
    return {"base_model": hub_id, "base_model_relation": kind if hub_id else None, **licence}


def _license_note(metadata: dict, hub_id: str | None, kind: str, license: str | None) -> str | None:
    if license or "license" not in metadata:
        return f"`{license}`" if license else None
    link = f" ([licence]({metadata['license_link']}))" if metadata.get("license_link") else ""
    return (f"This {'edit' if kind == 'adapter' else 'model'} is derived from `{hub_id}` and carries its licence, "
            f"`{metadata.get('license_name', metadata['license'])}`{link}, with its use terms.")


def _digest(text: str) -> str:
    return hashlib.sha256(_MARKER.sub("", text.replace("\r\n", "\n")).rstrip().encode("utf-8")).hexdigest()


def sign_card(text: str) -> str:
    """`text` (a README.md) with the marker of a card written by diffusers-uce appended (any old marker dropped)."""
    body = _MARKER.sub("", text).rstrip()
    return f"{body}\n\n<!-- written by diffusers-uce; sha256 of this card without this line: {_digest(body)} -->\n"


def is_generated_card(text: str) -> bool:
    """Whether a README.md is a card diffusers-uce wrote and nobody changed since (its marker's hash matches), so
    that a save or push may write a new one in its place. Any other README.md belongs to its author."""
    text = text.replace("\r\n", "\n")
    found = _MARKER.findall(text)
    return len(found) == 1 and found[0] == _digest(text)


# The report's picture (`EditReport.plot`), when saved next to a card under this name, is shown in the card.
REPORT_PLOT_NAME = "report.png"


def render_model_card(
    *, edits: Iterable[ConceptEdit | Mapping], base_model: str | None, kind: Literal["adapter", "finetune"],
    report: Mapping | Any | None = None, license: str | None = None, family: str | Family = "stable-diffusion",
    repo_id: str | None = None, weight_name: str | None = None, extra_tags: Iterable[str] = (),
    lora_weight_name: str | None = None, edit_options: str | None = None, files: CardFiles | None = None,
    template: str = DEFAULT_TEMPLATE, report_plot: str | None = None,
) -> ModelCard:
    r"""Render the model card of a concept edit.

    Args:
        edits (`list[ConceptEdit | dict]`): the edit records (`pipe.concept_edits`, or their `to_dict()`).
        base_model (`str`, *optional*): the base model's Hub id (a local path is left out of the metadata).
        kind (`str`): `"adapter"` for an edit file or LoRA applied on top of `base_model`, `"finetune"` for a full
            pipeline with the edit fused in; it is the metadata's `base_model_relation`.
        report (`dict`, *optional*): the edit report (`EditReport.to_dict()`; an `EditReport` works too).
        license (`str`, *optional*): the licence id; defaults to the base model's when it is a well-known model.
        family (`str` or `Family`, defaults to `"stable-diffusion"`): the pipeline family (`"stable-diffusion-xl"`,
            `"flux"`, or a `diffusers_uce.core.families.Family`): its Hub tags go in the metadata, its edited layers in
            the description.
        repo_id (`str`, *optional*): the repository the card is for, used in the loading snippets (a placeholder
            without it, which a push replaces).
        weight_name (`str`, *optional*): the edit file's name (when `files` is not given).
        extra_tags (`Iterable[str]`, defaults to `()`): more metadata tags.
        lora_weight_name (`str`, *optional*): the file name of a diffusers-format LoRA export of the edit (when `files`
            is not given); with it and no `weight_name`, the card is for a LoRA alone.
        edit_options (`str`, *optional*): a line on the options shared by all edits (edited projections, layers).
        files (`CardFiles`, *optional*): the files of an adapter card, each with its loading snippet; by default the
            edit file `weight_name` (`"uce_edits.safetensors"`) and the LoRA `lora_weight_name`. A card offers no
            snippet for a file that is not there: `load_concept_edits` needs the edit file, `custom_pipeline` the
            repository's `pipeline.py`.
        template (`str`, defaults to `"uce_card.md.jinja"`): the template's name in `diffusers_uce.model_cards`.
        report_plot (`str`, *optional*): the file name of the report's picture (`report.plot()`) saved next to the
            card, e.g. `"report.png"`: the card shows it under the report.

    Returns:
        [`huggingface_hub.ModelCard`]: the card; `card.data` holds the metadata, `str(card)` the README.md text, which
        ends with the marker `is_generated_card` recognises. LoRA files add the `lora` tag.

    Example:
    ```py
    >>> card = render_model_card(edits=pipe.concept_edits, base_model="CompVis/stable-diffusion-v1-4", kind="adapter",
    ...                          repo_id="me/sd14-no-van-gogh")
    >>> save_model_card(card, "sd14-no-van-gogh")
    ```
    """
    if kind not in CARD_KINDS:
        raise ValueError(f"unknown card kind {kind!r}; use 'adapter' (an edit file) or 'finetune' (a fused pipeline)")
    if kind == "finetune":  # a fused pipeline: no edit or LoRA file to load
        files = CardFiles()
    elif files is None:
        loras = (LoraFile(lora_weight_name),) if lora_weight_name else ()
        files = CardFiles(edit_file=weight_name or (None if loras else EDIT_WEIGHT_NAME), loras=loras)
    # Records as dicts (also those of a community pipeline, whose ConceptEdit is its own copy of the class).
    edits = [e.to_dict() if hasattr(e, "to_dict") else dict(e) for e in edits or ()]
    hub_id = hub_model_id(base_model)
    if base_model and not hub_id:
        logger.info(f"base model {base_model!r} is not a Hub model id: it is left out of the card's metadata")
    family = _family(family or "stable-diffusion")
    lora = ["lora"] if files.loras else []
    tags = list(dict.fromkeys(["diffusers", "text-to-image", "uce", "concept-editing", *lora, *family.tags,
                               *extra_tags]))
    metadata = card_metadata(hub_id, kind, license)
    card_data = ModelCardData(library_name="diffusers", pipeline_tag="text-to-image", tags=tags, **metadata)
    title, description = _texts(base_model, hub_id, kind, edits, family, files)
    from ..utils.versions import __version__

    with template_path(template) as path:
        card = ModelCard.from_template(
            card_data, template_path=str(path), title=title, description=description, kind=kind,
            edits=[edit_row(i, edit) for i, edit in enumerate(edits, 1)], report=report_view(report, report_plot),
            base_model=hub_id or base_model, repo_id=repo_id or REPO_PLACEHOLDER, edit_file=files.edit_file,
            loras=[f.view() for f in files.loras], community_pipeline=files.community_pipeline, no_lora=files.no_lora,
            edit_options=edit_options, license_note=_license_note(metadata, hub_id, kind, license),
            package_version=__version__, torch_dtype=SNIPPET_DTYPES.get(family.name, "float16"),
        )
    return ModelCard(sign_card(str(card)))


def card_for_pipeline(
    pipe: Any, kind: Literal["adapter", "finetune"], report: Mapping | Any | None = None, repo_id: str | None = None,
    weight_name: str | None = None, **kwargs,
) -> ModelCard:
    r"""Render the model card of a pipeline's concept edits, gathering what the pipeline knows.

    Args:
        pipe (`DiffusionPipeline`): a pipeline with `UCEMixin` (`pipe.concept_edits` lists its edits).
        kind (`str`): `"adapter"` (an edit file or LoRA) or `"finetune"` (the pipeline saved with the edit fused).
        report (`dict` or `EditReport`, *optional*): the edit report to show.
        repo_id (`str`, *optional*): the repository the card is for.
        weight_name (`str`, *optional*): the edit file's name.
        kwargs: passed to [`render_model_card`] (`base_model`, `license`, `files`, `extra_tags`...).

    Returns:
        [`huggingface_hub.ModelCard`]: the card. The base model is `base_model` when given, else `pipe.name_or_path`
        (the config's `_name_or_path`) when it is a Hub id or a Hub cache snapshot folder; the family (tags, edited
        layers) is the pipeline's `_uce_family`.
    """
    config = getattr(pipe, "config", None) or {}
    base = kwargs.pop("base_model", None) or getattr(pipe, "name_or_path", None) or (
        config.get("_name_or_path") if hasattr(config, "get") else None)
    settings = getattr(pipe, "concept_edit_settings", None)
    if settings is not None and "edit_options" not in kwargs:
        kwargs["edit_options"] = edit_options_line(settings)
    family = kwargs.pop("family", None) or getattr(pipe, "_uce_family", None) or family_of(type(pipe))
    return render_model_card(
        edits=tuple(getattr(pipe, "concept_edits", ()) or ()), base_model=base if isinstance(base, str) else None,
        kind=kind, report=report, family=family, repo_id=repo_id, weight_name=weight_name, **kwargs,
    )


def save_model_card(card: ModelCard | str, save_directory: str | os.PathLike, *, overwrite: bool = False) -> bool:
    r"""Write a card as `README.md` in a folder, atomically, keeping a README.md someone wrote there.

    A README.md that is a card diffusers-uce wrote, unchanged since (`is_generated_card`), is replaced: it describes
    an earlier save, and the new card describes what the folder holds now.

    Args:
        card (`ModelCard` or `str`): the card (or the README text).
        save_directory (`str` or `os.PathLike`): the folder (created if needed).
        overwrite (`bool`, defaults to `False`): replace any existing README.md.

    Returns:
        `bool`: whether the card was written (`False` when an existing README.md was kept).
    """
    path = Path(save_directory) / "README.md"
    replace = overwrite or not path.exists() or is_generated_card(path.read_text(encoding="utf-8", errors="replace"))
    if not replace:
        logger.warning(f"kept the existing {path}; pass overwrite=True to replace it with the generated model card")
        return False
    try:
        write_text_atomic(path, str(card), overwrite=overwrite or path.exists())
    except FileExistsError:  # another writer's card appeared meanwhile: keep it, as above
        logger.warning(f"kept the existing {path}; pass overwrite=True to replace it with the generated model card")
        return False
    logger.info(f"model card written to {path}")
    return True

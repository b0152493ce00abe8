"""Model cards for concept edits: Hub metadata, what was edited, the edit report, how to load it, and the citation.

The Jinja template lives in the top-level `model_cards/` folder, which setup.cfg ships as the
`diffusers_uce.model_cards` package; it is found with `importlib.resources`, so installed wheels have it too.
"""

from __future__ import annotations

import importlib.resources
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Mapping, Sequence

from diffusers.utils import logging
from huggingface_hub import ModelCard, ModelCardData

from ..core.edits import ConceptEdit
from ..core.families import FAMILIES, Family, family_of
from ..core.report import EditReport
from ..utils.files import write_text_atomic

logger = logging.get_logger(__name__)

TEMPLATE_PACKAGE = "diffusers_uce.model_cards"
DEFAULT_TEMPLATE = "uce_card.md.jinja"
CARD_KINDS = ("adapter", "finetune")
PAPER_URL = "https://arxiv.org/abs/2308.14761"
MAX_REPORT_ROWS = 24

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
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
_HUB_CACHE_DIR = re.compile(r"models--([\w.-]+?)--([\w.-]+)")
_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>|])")


@contextmanager
def template_path(name: str = DEFAULT_TEMPLATE) -> Iterator[Path]:
    """The file system path of a card template of the `diffusers_uce.model_cards` package, as a context manager.

    Args:
        name (`str`, defaults to `"uce_card.md.jinja"`): the template's file name.

    Example:
    ```py
    >>> with template_path() as path:
    ...     print(path.read_text()[:3])
    ---
    ```
    """
    try:
        resource = importlib.resources.files(TEMPLATE_PACKAGE).joinpath(name)
    except ModuleNotFoundError:
        # A source checkout whose editable install predates the `package_dir` mapping: read the folder directly.
        resource = Path(__file__).resolve().parent.parent / "model_cards" / name
        logger.debug(f"{TEMPLATE_PACKAGE} is not importable; reinstall the package. Using {resource}")
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
    if _HUB_ID.match(text) and not os.path.exists(text):
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


def _md(value: Any) -> str:
    """Text safe inside a markdown table cell."""
    return _MD_SPECIAL.sub(r"\\\1", " ".join(str(value).split()))


def _number(value: Any) -> str:
    return f"{value:g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else _md(value)


def _concept(text: str) -> str:
    return _md(text) if text and text.strip() else "*unconditional*"


def _edit_row(index: int, data: Mapping) -> dict[str, str]:
    erase = [data["erase"]] if isinstance(data.get("erase"), str) else list(data.get("erase") or ())
    guide = data.get("guide")
    guides = [guide] * len(erase) if guide is None or isinstance(guide, str) else list(guide)
    guides = guides * len(erase) if len(guides) == 1 else guides
    preserve = [data["preserve"]] if isinstance(data.get("preserve"), str) else list(data.get("preserve") or ())
    return {
        "index": str(index),
        "pairs": "; ".join(f"{_concept(e)} → {_concept(g or '')}" for e, g in zip(erase, guides + [""] * len(erase))),
        "preserved": "; ".join(_concept(p) for p in preserve),
        **{key: _number(data[key]) if data.get(key) is not None else "—"
           for key in ("erase_scale", "preserve_scale", "lamb")},
        **{key: _md(data[key]) if data.get(key) else "—" for key in ("token_mode", "technique")},
        **_harden_cell(data.get("technique"), data.get("harden")),
        **(_precise_row(data, preserve) if data.get("method", "uce") != "uce" else {}),
    }


def _harden_cell(technique, harden) -> dict:
    """A hardened edit's technique cell also gives its rounds and ``ρ`` (e.g. "replace, hardened: 3 rounds, ρ 0.1")."""
    if not harden:
        return {}
    rounds = harden.get("rounds")
    return {"technique": f"{_md(technique or 'replace')}, hardened: {rounds} round{'s' * (rounds != 1)}, "
                         f"ρ {_number(harden.get('reg'))} ({_md(harden.get('tokens'))} tokens)"}


def _precise_row(data: Mapping, preserve: list[str]) -> dict[str, str]:
    """A precise-erasure record's cells: its method and options in the technique column, its retain set summed up."""
    options = ", ".join(f"{k}={v if k != 'invariants' or isinstance(v, str) else f'{len(v)} tokens'}"
                        for k, v in (data.get("method_options") or {}).items())
    retain = f"retain set of {len(preserve)}: {_names(preserve)}" if preserve else "retain: \"\""
    return {"preserved": retain, "erase_scale": "—", "preserve_scale": "—", "lamb": "—",
            "technique": _md(f"{data['method']} ({options})")}


def _report_view(report: Any) -> dict | None:
    """The numbers the template shows, from `EditReport.to_dict()` (or an `EditReport`/`ConceptEditOutput`)."""
    report = getattr(report, "report", report)
    if report is None or (isinstance(report, Mapping) and not report):
        return None
    report = EditReport.from_dict(report.to_dict() if hasattr(report, "to_dict") else dict(report))
    data, summary = report.to_dict(), report.summary()
    erased, preserved, held = report.erased, report.preserved, report.held_out
    fmt = lambda x: None if x is None else f"{x:.4f}"  # noqa: E731
    rows = [{"role": "erased", "concept": _concept(r["concept"]), "guide": "→ " + _concept(r.get("guide") or ""),
             "metric": "efficacy", "value": fmt(r["efficacy"])} for r in erased]
    rows += [{"role": role, "concept": _concept(r["concept"]), "guide": "", "metric": "interference",
              "value": fmt(r["interference"])} for role, part in (("preserved", preserved), ("held-out", held))
             for r in part]
    rows += [{"role": "robustness", "concept": _concept(r["concept"]),
              "guide": f"ρ {_number(r['reg'])}, {r['rounds']} rounds: " + " → ".join(f"{v:.2f}"
                                                                                   for v in r["recovery"]),
              "metric": "adversarial recovery", "value": fmt(r["recovery"][-1])} for r in report.robustness]
    hidden = len(rows) - MAX_REPORT_ROWS
    return {
        "mean_efficacy": fmt(summary["mean_efficacy"]),
        "mean_preserved": fmt(summary["mean_preserved_interference"]),
        "mean_held_out": fmt(summary["mean_held_out_interference"]),
        "max_invariant_change": fmt(summary.get("max_invariant_change")),
        "layers": str(data["layers"]) if data.get("layers") else None,
        "rows": rows[:MAX_REPORT_ROWS],
        "more": f"*… and {hidden} more rows.*" if hidden > 0 else None,
    }


def _names(values: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(_concept(v) for v in values[:limit])
    return shown + (f" and {len(values) - limit} more" if len(values) > limit else "")


def _erased(edits: list[dict]) -> list[str]:
    out = []
    for edit in edits:
        out += [edit["erase"]] if isinstance(edit.get("erase"), str) else list(edit.get("erase") or ())
    return out


def _texts(base_model: str | None, hub_id: str | None, kind: str, edits: list[dict],
           family: Family) -> tuple[str, str]:
    """The card's title and description paragraph."""
    erased = _erased(edits)
    preserves = any(e.get("preserve") for e in edits)
    short = (hub_id or base_model or "").rstrip("/\\").replace("\\", "/").split("/")[-1]
    title = (f"{short}: " if short else "") + (f"{_names(erased)} erased with UCE" if erased else "")
    title = title.rstrip(": ") or "Concept edit made with UCE"
    base = f"[`{hub_id}`](https://huggingface.co/{hub_id})" if hub_id else (f"`{base_model}`" if base_model else None)
    uce = f"Unified Concept Editing (UCE; [Gandikota et al., WACV 2024]({PAPER_URL}))"
    change = f"a closed-form rewrite of {_edited_layers(family)}"
    what = (f" that erases {len(erased)} concept{'s' * (len(erased) != 1)} ({_names(erased, 5)}) toward "
            f"{'its guide' if len(erased) == 1 else 'their guides'}" if erased else "")
    what += ", preserving the concepts listed below" if preserves else ""
    if kind == "finetune":
        text = (f"{base or 'A text-to-image model'} with a concept edit fused into its weights: {change} made with "
                f"{uce}{what}. It loads as a plain diffusers pipeline.")
    else:
        text = (f"A concept edit for {base or 'a text-to-image model'} made with {uce}: {change}{what}. This "
                "repository holds the edit, not a full model: apply it to the base model, where it can be scaled, "
                "fused or unloaded.")
    return title, text


def render_model_card(
    *, edits: Iterable[ConceptEdit | Mapping], base_model: str | None, kind: Literal["adapter", "finetune"],
    report: Mapping | Any | None = None, license: str | None = None, family: str | Family = "stable-diffusion",
    repo_id: str | None = None, weight_name: str | None = None, extra_tags: Iterable[str] = (),
    lora_weight_name: str | None = None, edit_options: str | None = None, template: str = DEFAULT_TEMPLATE,
) -> ModelCard:
    r"""Render the model card of a concept edit.

    Args:
        edits (`list[ConceptEdit | dict]`): the edit records (`pipe.concept_edits`, or their `to_dict()`).
        base_model (`str`, *optional*): the base model's Hub id (a local path is left out of the metadata).
        kind (`str`): `"adapter"` for an edit file applied on top of `base_model`, `"finetune"` for a full pipeline
            with the edit fused in; it is the metadata's `base_model_relation`.
        report (`dict`, *optional*): the edit report (`EditReport.to_dict()`; an `EditReport` works too).
        license (`str`, *optional*): the licence id; defaults to the base model's when it is a well-known model.
        family (`str` or `Family`, defaults to `"stable-diffusion"`): the pipeline family (`"stable-diffusion-xl"`,
            `"flux"`, or a `diffusers_uce.core.families.Family`): its Hub tags go in the metadata, its edited layers in
            the
            description.
        repo_id (`str`, *optional*): the repository the card is for, used in the loading snippets.
        weight_name (`str`, *optional*): the edit file's name, when not the default one.
        extra_tags (`Iterable[str]`, defaults to `()`): more metadata tags.
        lora_weight_name (`str`, *optional*): the file name of a LoRA export of the edit in the same repository.
        edit_options (`str`, *optional*): a line on the options shared by all edits (edited projections, layers).
        template (`str`, defaults to `"uce_card.md.jinja"`): the template's name in `diffusers_uce.model_cards`.

    Returns:
        [`huggingface_hub.ModelCard`]: the card; `card.data` holds the metadata, `str(card)` the README.md text.

    Example:
    ```py
    >>> card = render_model_card(edits=pipe.concept_edits, base_model="CompVis/stable-diffusion-v1-4", kind="adapter",
    ...                          repo_id="me/sd14-no-van-gogh")
    >>> save_model_card(card, "sd14-no-van-gogh")
    ```
    """
    if kind not in CARD_KINDS:
        raise ValueError(f"unknown card kind {kind!r}; use 'adapter' (an edit file) or 'finetune' (a fused pipeline)")
    # Records as dicts (also those of a community pipeline, whose ConceptEdit is its own copy of the class).
    edits = [e.to_dict() if hasattr(e, "to_dict") else dict(e) for e in edits or ()]
    rows = [_edit_row(i, edit) for i, edit in enumerate(edits, 1)]
    hub_id = hub_model_id(base_model)
    if base_model and not hub_id:
        logger.info(f"base model {base_model!r} is not a Hub model id: it is left out of the card's metadata")
    licence = {"license": license} if license else dict(KNOWN_BASE_LICENSES.get(hub_id or "", {}))
    family = _family(family or "stable-diffusion")
    tags = list(dict.fromkeys(["diffusers", "text-to-image", "uce", "concept-editing", *family.tags, *extra_tags]))
    card_data = ModelCardData(
        library_name="diffusers", pipeline_tag="text-to-image", base_model=hub_id,
        base_model_relation=kind if hub_id else None, tags=tags, **licence,
    )
    title, description = _texts(base_model, hub_id, kind, edits, family)
    if licence and not license:
        link = f" ([licence]({licence['license_link']}))" if licence.get("license_link") else ""
        license_note = (f"This {'edit' if kind == 'adapter' else 'model'} is derived from `{hub_id}` and carries its "
                        f"licence, `{licence.get('license_name', licence['license'])}`{link}, with its use terms.")
    else:
        license_note = f"`{license}`" if license else None
    from ..utils.versions import __version__

    with template_path(template) as path:
        return ModelCard.from_template(
            card_data, template_path=str(path), title=title, description=description, kind=kind, edits=rows,
            report=_report_view(report), base_model=hub_id or base_model, repo_id=repo_id, weight_name=weight_name,
            lora_weight_name=lora_weight_name, edit_options=edit_options, license_note=license_note,
            package_version=__version__, torch_dtype=SNIPPET_DTYPES.get(family.name, "float16"),
        )


def card_for_pipeline(
    pipe: Any, kind: Literal["adapter", "finetune"], report: Mapping | Any | None = None, repo_id: str | None = None,
    weight_name: str | None = None, **kwargs,
) -> ModelCard:
    r"""Render the model card of a pipeline's concept edits, gathering what the pipeline knows.

    Args:
        pipe (`DiffusionPipeline`): a pipeline with `UCEMixin` (`pipe.concept_edits` lists its edits).
        kind (`str`): `"adapter"` (an edit file) or `"finetune"` (the pipeline saved with the edit fused).
        report (`dict` or `EditReport`, *optional*): the edit report to show.
        repo_id (`str`, *optional*): the repository the card is for.
        weight_name (`str`, *optional*): the edit file's name.
        kwargs: passed to [`render_model_card`] (`license`, `extra_tags`, `lora_weight_name`...).

    Returns:
        [`huggingface_hub.ModelCard`]: the card. The base model is `pipe.name_or_path` (the config's `_name_or_path`)
        when it is a Hub id or a Hub cache snapshot folder; the family (tags, edited layers) is the pipeline's
        `_uce_family`.
    """
    config = getattr(pipe, "config", None) or {}
    base = getattr(pipe, "name_or_path", None) or (config.get("_name_or_path") if hasattr(config, "get") else None)
    settings = getattr(pipe, "concept_edit_settings", None)
    if settings is not None and "edit_options" not in kwargs:
        kwargs["edit_options"] = _edit_options(settings)
    family = kwargs.pop("family", None) or getattr(pipe, "_uce_family", None) or family_of(type(pipe))
    return render_model_card(
        edits=tuple(getattr(pipe, "concept_edits", ()) or ()), base_model=base if isinstance(base, str) else None,
        kind=kind, report=report, family=family, repo_id=repo_id, weight_name=weight_name, **kwargs,
    )


def _edit_options(settings: Mapping) -> str:
    """The card's line on the edited layers and the strength of an applied edit (`pipe.concept_edit_settings`)."""
    parts = []
    for group in settings["groups"]:
        if group.modules:
            parts += [f"`{group.component}.{module}`" for module in group.modules]
            continue
        layers = settings["layers"]
        scope = ("every cross-attention layer" if layers is None else "the cross-attention layers chosen by a filter"
                 if callable(layers) else "the cross-attention layers matching " + ", ".join(map(str, layers)))
        keys = '`to_k` and `to_v`' if settings["edit_keys"] else '`to_v`'
        parts.append(f"{keys} of {_md(scope)}")
    return f"Edited projections: {'; '.join(parts)}; strength {settings['scale']:g}."


def save_model_card(card: ModelCard | str, save_directory: str | os.PathLike, *, overwrite: bool = False) -> bool:
    r"""Write a card as `README.md` in a folder, atomically, keeping a README.md that is already there.

    Args:
        card (`ModelCard` or `str`): the card (or the README text).
        save_directory (`str` or `os.PathLike`): the folder (created if needed).
        overwrite (`bool`, defaults to `False`): replace an existing README.md.

    Returns:
        `bool`: whether the card was written (`False` when an existing README.md was kept).
    """
    path = Path(save_directory) / "README.md"
    if path.exists() and not overwrite:
        logger.warning(f"kept the existing {path}; pass overwrite=True to replace it with the generated model card")
        return False
    try:
        write_text_atomic(path, str(card), overwrite=overwrite)
    except FileExistsError:  # another writer's card appeared meanwhile: keep it, as above
        logger.warning(f"kept the existing {path}; pass overwrite=True to replace it with the generated model card")
        return False
    logger.info(f"model card written to {path}")
    return True

"""Edit records: what one `apply_concept_edits` call asked for, validated before anything is touched."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Sequence

from ..utils.checks import finite_number, non_negative_number
from .concepts import MODERATION_DEFAULTS, broadcast_guides, erase_requests, resolve_concept_arg, split_concepts
from .limits import MAX_ATTRIBUTE_SETS, MAX_EDITS, MAX_PROMPTS, MAX_TOTAL_PROMPTS, check_count
from .speed_options import check_speed_record, resolve_method_options

TOKEN_MODES = ("last", "paper")
TECHNIQUES = ("replace", "tensor")


@dataclass(frozen=True)
class DebiasTarget:
    """A concept to debias: its keys/values move toward a weighted mix of its attribute variants.

    Args:
        concept (`str`): the concept, e.g. `"doctor"`.
        attribute_sets (`tuple[tuple[str, ...], ...]`): one or more sets of attributes, e.g.
            `(("male", "female"), ("white", "black", "asian"))`.
        weights (`tuple[tuple[float, ...], ...]`): the weight ``w_a`` of each attribute (same shape); the debias loop
            moves them until the generated images reach the desired ratios.
    """

    concept: str
    attribute_sets: tuple[tuple[str, ...], ...]
    weights: tuple[tuple[float, ...], ...]

    def attribute_prompts(self) -> tuple[str, ...]:
        """Every attribute as a prompt, all sets flattened: "female" for "doctor" becomes "female doctor"."""
        return tuple(a if self.concept.lower() in a.lower() else f"{a} {self.concept}"
                     for group in self.attribute_sets for a in group)

    def flat_weights(self) -> tuple[float, ...]:
        return tuple(w for group in self.weights for w in group)


@dataclass(frozen=True)
class ConceptEdit:
    """One validated edit request; `pipe.concept_edits` lists these in the order they were applied.

    Args:
        erase (`tuple[str, ...]`): concepts to erase.
        guide (`tuple[str, ...]`): one guide per erased concept; `""` is the unconditional prompt.
        preserve (`tuple[str, ...]`): concepts whose keys/values must stay as they are.
        erase_scale (`float`): weight ``s_e`` of the erase terms.
        preserve_scale (`float`): weight ``s_p`` of the preserve terms (the resolved default when `None` was given).
        lamb (`float`): the regulariser ``λ`` towards the original weights.
        token_mode (`str`): `"last"` (one token per concept) or `"paper"` (the paper's token blocks).
        technique (`str`): `"replace"` (target = the guide's original output) or `"tensor"`.
        harden (`dict`, *optional*): the hardening rounds run after the edit is solved: ``{"rounds", "reg", "lamb",
            "preserve_scale", "preserve", "tokens"}`` (see `diffusers_uce.core.hardening.HardenOptions`).
        method (`str`): `"uce"` or `"speed"` (precise erasure; `preserve` is then its retain set).
        method_options (`dict`): the options of `method`, defaults filled in (empty for `"uce"`).
        name (`str`): the edit's name (`adapter_name`), used by `remove_concept_edits`; `""` for records of files
            saved before edits had names.
    """

    erase: tuple[str, ...]
    guide: tuple[str, ...]
    preserve: tuple[str, ...] = ()
    erase_scale: float = 1.0
    preserve_scale: float = 1.0
    lamb: float = 0.5
    token_mode: str = "last"
    technique: str = "replace"
    debias: tuple[DebiasTarget, ...] = ()
    harden: dict | None = None
    method: str = "uce"
    method_options: dict = field(default_factory=dict)
    name: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, earlier: Sequence["ConceptEdit"] = ()) -> "ConceptEdit":
        """Rebuild a record from `to_dict()` output, validated exactly as `apply_concept_edits` validates it."""
        if not isinstance(data, dict) or not set(data) <= set(cls.__dataclass_fields__) or "erase" not in data:
            raise ValueError(f"not an edit record: {data!r}")
        debias = data.get("debias") or ()
        if not isinstance(debias, (list, tuple)) or not all(isinstance(t, dict) for t in debias):
            raise ValueError(f"invalid debias targets in edit record: {debias!r}")
        record = build_concept_edit(
            data["erase"], data.get("guide", None), data.get("preserve"), earlier=earlier,
            **{k: data[k] for k in ("erase_scale", "preserve_scale", "lamb", "token_mode", "technique", "method",
                                    "method_options") if k in data},
            debias={t.get("concept"): t.get("attribute_sets") for t in debias} or None,
            debias_weights={t.get("concept"): t.get("weights") for t in debias} or None,
            harden=data.get("harden"), name=data.get("name", ""),
        )
        if _as_lists(record.to_dict()) != _as_lists({**record.to_dict(), **data}):
            raise ValueError(f"edit record does not round-trip (was it edited by hand?): {data!r}")
        return record

    def with_debias_weights(self, weights: dict) -> "ConceptEdit":
        """The same edit with other attribute weights, `{concept: [[w per attribute] per set]}` (zeros if missing)."""
        targets = []
        for t in self.debias:
            new = weights.get(t.concept) or [[0.0] * len(group) for group in t.attribute_sets]
            values = tuple(tuple(finite_number(w, f"debias weight of {t.concept!r}") for w in ws) for ws in new)
            if [len(v) for v in values] != [len(g) for g in t.attribute_sets]:
                raise ValueError(f"weights of {t.concept!r} must be shaped like {[list(g) for g in t.attribute_sets]}")
            targets.append(replace(t, weights=values))
        return replace(self, debias=tuple(targets))

    def guide_prompt(self, guide: str) -> str:
        """The prompt encoded for a guide: in "paper" mode an empty guide is encoded as " "."""
        return " " if self.token_mode == "paper" and guide == "" else guide

    def preserve_prompts(self) -> tuple[str, ...]:
        """Preserved prompts as solved: "paper" mode always adds the unconditional prompt."""
        if self.token_mode == "paper" and "" not in self.preserve:
            return self.preserve + ("",)
        return self.preserve

    def prompts(self) -> list[str]:
        """Every prompt this edit needs encoded."""
        debias = [p for t in self.debias for p in (t.concept, *t.attribute_prompts())]
        return [*self.erase, *(self.guide_prompt(g) for g in self.guide), *self.preserve_prompts(), *debias]


def _as_lists(value):
    """JSON view of a record field: tuples become lists, recursively (what `to_dict` gives after a JSON trip)."""
    if isinstance(value, (list, tuple)):
        return [_as_lists(v) for v in value]
    if isinstance(value, dict):
        return {k: _as_lists(v) for k, v in value.items()}
    return value


def _concept_list(value, what: str, allow_empty_strings: bool = False) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, Sequence):
        raise TypeError(f"{what} must be a string or a list of strings, got {type(value).__name__}")
    check_count(len(value), f"the number of entries of {what}", MAX_PROMPTS)
    out = []
    for item in value:
        if item is None and allow_empty_strings:
            item = ""
        if not isinstance(item, str):
            raise TypeError(f"{what} must contain strings only, got {item!r} ({type(item).__name__})")
        item = item.strip()
        if not item and not allow_empty_strings:
            raise ValueError(f"{what} contains an empty concept; remove it or give the concept's text")
        out.append(item)
    return tuple(out)


def build_concept_edit(
    erase, guide=None, preserve=None, *, erase_scale=1.0, preserve_scale=None, lamb=0.5,
    token_mode="last", technique="replace", earlier: Sequence[ConceptEdit] = (), debias=None, debias_weights=None,
    harden=None, method="uce", method_options=None, name: str = "",
) -> ConceptEdit:
    """Validate one request and resolve its defaults; raises before any weight is touched.

    Args:
        erase (`str` or `list[str]`): concepts to erase (non-empty strings).
        guide (`str`, `list[str]` or `None`): one guide for all, or one per erased concept; `None`/`""` means the
            unconditional prompt.
        preserve (`str` or `list[str]`, *optional*): concepts to keep as they are.
        earlier (`Sequence[ConceptEdit]`): edits already applied, checked for conflicts.
        debias (`dict[str, list[str] | list[list[str]]]`, *optional*): concepts to debias, each with one attribute
            set (`{"doctor": ["male", "female"]}`) or several (`{"doctor": [["male", "female"], ["young", "old"]]}`).
        debias_weights (`dict[str, list[float] | list[list[float]]]`, *optional*): attribute weights, shaped like
            `debias` (zeros by default).
        harden (`dict`, *optional*): resolved hardening (`hardening.resolve_harden`), checked again here.
        method (`str`, defaults to `"uce"`): `"uce"` or `"speed"`; every edit of a pipeline uses the same method.
        method_options (`dict`, *optional*): options of `method` (see `speed_options.SPEED_DEFAULTS`).
        name (`str`, defaults to `""`): the edit's name.
    """
    if not isinstance(name, str):
        raise TypeError(f"adapter_name must be a string, got {name!r}")
    check_count(len(earlier) + 1, "the number of concept edits", MAX_EDITS)
    method_options = resolve_method_options(method, method_options)
    erase_list = _concept_list(erase, "erase")
    targets = _debias_targets(debias, debias_weights)
    if not erase_list and not targets:
        raise ValueError("erase is empty: give at least one concept to erase, e.g. erase=['Van Gogh']")
    guides = _concept_list(broadcast_guides(guide, len(erase_list)), "guide", allow_empty_strings=True)
    preserve_list = tuple(dict.fromkeys(_concept_list(preserve, "preserve")))
    check_count(sum(len(e.erase) + len(e.preserve) for e in earlier) + len(erase_list) + len(preserve_list),
                "the number of erased and preserved prompts of all edits together", MAX_TOTAL_PROMPTS)
    if token_mode not in TOKEN_MODES:
        raise ValueError(f"unknown token_mode {token_mode!r}; use one of {', '.join(map(repr, TOKEN_MODES))}")
    if technique not in TECHNIQUES:
        raise ValueError(f"unknown technique {technique!r}; use one of {', '.join(map(repr, TECHNIQUES))}")
    if targets and token_mode != "last":
        raise ValueError("debiasing supports token_mode='last' only; pass token_mode='last' for the debias call")
    precise = method == "speed" or any(e.method != method for e in earlier)
    # precise erasure drops retain prompts that name an erased concept instead of refusing them
    _check_contradictions(erase_list, guides, preserve_list, [t.concept for t in targets], earlier,
                          preserved_may_be_erased=precise)
    if precise:
        erased_all = set(erase_list).union(*(e.erase for e in earlier))
        check_speed_record(method, method_options, earlier, erased_all, preserve_list, targets,
                           erase_scale=erase_scale, preserve_scale=preserve_scale, lamb=lamb, token_mode=token_mode,
                           technique=technique)
        if harden:
            raise ValueError("harden applies to method='uce' edits: leave it out with method='speed'")
        return ConceptEdit(erase=erase_list, guide=guides, preserve=preserve_list, preserve_scale=1.0,
                           method=method, method_options=method_options, name=name)
    erase_scale = non_negative_number(erase_scale, "erase_scale")
    lamb = non_negative_number(lamb, "lamb", positive=True)
    if preserve_scale is None:
        preserve_scale = max(0.1, 1.0 / (1 + len(preserve_list))) if token_mode == "paper" else 1.0
    preserve_scale = non_negative_number(preserve_scale, "preserve_scale")
    for e in earlier:
        if e.lamb != lamb:
            raise ValueError(
                f"lamb={lamb} differs from the lamb={e.lamb} of the edits already applied; edits are solved jointly "
                "with one lamb: pass the same value, or call unload_concept_edits() first"
            )
    from .hardening import check_harden_record  # here: the command line imports this module and must start fast

    harden = check_harden_record(harden, erase_list)
    _check_hardening_compatible(harden, technique, targets, earlier)
    return ConceptEdit(
        erase=erase_list, guide=guides, preserve=preserve_list, erase_scale=erase_scale,
        preserve_scale=preserve_scale, lamb=lamb, token_mode=token_mode, technique=technique, debias=targets,
        harden=harden, name=name,
    )


def check_held_out(held_out) -> list[str] | None:
    """The held-out concepts of a call as a list (`None`: the built-in set); a string is split on `";"`
    (`split_concepts`), so `""` is no held-out concept."""
    if isinstance(held_out, str):
        held_out = split_concepts(held_out)
    return None if held_out is None else list(_concept_list(held_out, "held_out"))


def concept_key(concept: str) -> str:
    """How a concept is compared with others: case and runs of spaces do not matter ("Van Gogh" is "van  gogh"), as
    for the CLIP tokenizers, which lowercase."""
    return " ".join(concept.casefold().split())


def _check_contradictions(erase, guides, preserve, debiased, earlier: Sequence[ConceptEdit], *,
                          preserved_may_be_erased: bool = False) -> None:
    """Refuse requests that contradict themselves or the edits already applied (concepts compared by `concept_key`):
    a concept erased twice (double weight, or two guides), erased and preserved, or debiased and anything else."""
    seen: dict[str, str] = {}
    for concept, guide in zip(erase, guides):
        if concept_key(concept) in seen:
            raise ValueError(f"erase lists {concept!r} more than once (concepts are compared ignoring case): "
                             "give each concept once")
        seen[concept_key(concept)] = guide
    for e in earlier:
        for concept, guide in zip(e.erase, e.guide):
            if concept_key(concept) in seen:
                toward = "toward the same guide" if seen[concept_key(concept)] == guide else f"toward {guide!r}"
                raise ValueError(f"{concept!r} is already erased {toward} by an earlier edit: leave it out of this "
                                 "call, or call unload_concept_edits() and erase it again")
    erased = {concept_key(c): c for c in (*erase, *(c for e in earlier for c in e.erase))}
    preserved = {concept_key(c): c for c in (*preserve, *(c for e in earlier for c in e.preserve))}
    clash = sorted(erased[k] for k in erased.keys() & preserved.keys())
    if clash and not preserved_may_be_erased:
        raise ValueError(
            f"{', '.join(map(repr, clash))} is both erased and preserved (in this call or an earlier one; concepts "
            "are compared ignoring case): remove it from one of the two lists"
        )
    overlap = sorted(c for c in debiased if concept_key(c) in erased.keys() | preserved.keys())
    if overlap:
        raise ValueError(f"{', '.join(map(repr, overlap))} is debiased and also erased or preserved: "
                         "a concept can be in one of the three only")


def _check_hardening_compatible(harden, technique, targets, earlier) -> None:
    """Hardening acts on the one transform every layer shares: refuse it next to per-layer edits."""
    per_layer = technique == "tensor" or bool(targets)
    earlier_per_layer = any(e.technique == "tensor" or e.debias for e in earlier)
    if harden and (per_layer or earlier_per_layer):
        raise ValueError("harden does not support the 'tensor' technique or debiasing (their transform differs per "
                         "layer): use technique='replace', or edit without harden")
    if per_layer and any(e.harden for e in earlier):
        raise ValueError("a hardened edit is applied: the 'tensor' technique and debiasing cannot join it; call "
                         "unload_concept_edits() first, or use technique='replace'")


def _debias_targets(debias, debias_weights) -> tuple[DebiasTarget, ...]:
    """Validate `debias` / `debias_weights` into `DebiasTarget`s (weights default to zeros)."""
    if debias is None:
        if debias_weights:
            raise ValueError("debias_weights given without debias: give the concepts and their attributes too")
        return ()
    if not isinstance(debias, dict) or not debias:
        raise TypeError('debias must be a non-empty dict like {"doctor": ["male", "female"]}')
    debias_weights = debias_weights or {}
    unknown = sorted(set(debias_weights) - set(debias))
    if unknown:
        raise ValueError(f"debias_weights names concepts that are not debiased: {unknown}")
    check_count(len(debias), "the number of debiased concepts", MAX_PROMPTS)
    targets = []
    for concept, sets in debias.items():
        concept = _concept_list(concept, "debias concept")[0] if isinstance(concept, str) else concept
        if not isinstance(concept, str) or not concept:
            raise TypeError(f"debias keys must be concept strings, got {concept!r}")
        if isinstance(sets, (list, tuple)) and sets and all(isinstance(a, str) for a in sets):
            sets = [sets]
        if not isinstance(sets, (list, tuple)) or not sets:
            raise ValueError(f"debias[{concept!r}] needs attributes, e.g. ['male', 'female']")
        check_count(len(sets), f"the number of attribute sets of {concept!r}", MAX_ATTRIBUTE_SETS)
        groups = []
        for group in sets:
            group = _concept_list(group, f"attributes of {concept!r}")
            if len(group) < 2 or len(set(group)) != len(group):
                raise ValueError(f"debias[{concept!r}]: each attribute set needs at least two distinct attributes, "
                                 f"got {list(group)}")
            groups.append(group)
        weights = debias_weights.get(concept)
        if weights is None:
            weights = [[0.0] * len(g) for g in groups]
        elif len(groups) == 1 and weights and not isinstance(weights[0], (list, tuple)):
            weights = [weights]
        if len(weights) != len(groups) or any(len(w) != len(g) for w, g in zip(weights, groups)):
            raise ValueError(f"debias_weights[{concept!r}] must have one weight per attribute, shaped like "
                             f"{[list(g) for g in groups]}")
        weights = tuple(tuple(finite_number(w, f"debias weight of {concept!r}") for w in ws) for ws in weights)
        targets.append(DebiasTarget(concept, tuple(groups), weights))
    return tuple(targets)


def concept_edit_request(
    erase=None, guide=None, preserve=None, *, moderate=None, expand_prompts=None, erase_scale=1.0,
    preserve_scale=None, lamb=0.5, token_mode="last", technique="replace", earlier: Sequence[ConceptEdit] = (),
    debias=None, debias_weights=None, harden=False, harden_options=None, method="uce", method_options=None,
    name: str = "",
) -> ConceptEdit:
    r"""Everything `apply_concept_edits`, `debias_concepts` and the command line accept, as one validated record.

    Concept files (`"@file.txt"`) are read, moderation presets resolved (their concepts erased toward `""`, with
    `preserve_scale=0.1` unless given), prompt templates applied (`expand_prompts="art"` or `"object"`), guides
    broadcast to one per erased concept, and every value checked; nothing is touched.

    Args:
        erase, guide, preserve, moderate, expand_prompts, erase_scale, preserve_scale, lamb, token_mode, technique:
            as `apply_concept_edits` takes them.
        earlier (`Sequence[ConceptEdit]`): edits already applied, checked for conflicts.
        debias, debias_weights: debiased concepts and their attribute weights, as `build_concept_edit` takes them.
        harden, harden_options: hardening rounds and their options, as `apply_concept_edits` takes them.
        method, method_options: the edit method and its options, as `build_concept_edit` takes them.
        name (`str`, defaults to `""`): the edit's name.

    Returns:
        [`ConceptEdit`]: the record.
    """
    erase, guide = erase_requests(erase, guide, moderate=moderate, expand=expand_prompts)
    from .hardening import resolve_harden  # (torch, only when a request is built)

    harden = resolve_harden(harden, harden_options, erase=erase, moderate=moderate, expand_prompts=expand_prompts)
    if moderate is not None and preserve_scale is None and method == "uce":
        preserve_scale = MODERATION_DEFAULTS["preserve_scale"]
    return build_concept_edit(
        erase, guide, resolve_concept_arg(preserve), erase_scale=erase_scale, preserve_scale=preserve_scale,
        lamb=lamb, token_mode=token_mode, technique=technique, earlier=earlier, debias=debias,
        debias_weights=debias_weights, harden=harden, method=method, method_options=method_options, name=name,
    )

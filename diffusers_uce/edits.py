"""Edit records: what one `apply_concept_edits` call asked for, validated before anything is touched."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

TOKEN_MODES = ("last", "paper")
TECHNIQUES = ("replace", "tensor")


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
    """

    erase: tuple[str, ...]
    guide: tuple[str, ...]
    preserve: tuple[str, ...] = ()
    erase_scale: float = 1.0
    preserve_scale: float = 1.0
    lamb: float = 0.5
    token_mode: str = "last"
    technique: str = "replace"

    def to_dict(self) -> dict:
        return asdict(self)

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
        return [*self.erase, *(self.guide_prompt(g) for g in self.guide), *self.preserve_prompts()]


def _concept_list(value, what: str, allow_empty_strings: bool = False) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, Sequence):
        raise TypeError(f"{what} must be a string or a list of strings, got {type(value).__name__}")
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


def _number(value, name: str, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be {'> 0' if positive else '>= 0'} and finite, got {value}")
    return value


def build_concept_edit(
    erase, guide=None, preserve=None, *, erase_scale=1.0, preserve_scale=None, lamb=0.5,
    token_mode="last", technique="replace", earlier: Sequence[ConceptEdit] = (),
) -> ConceptEdit:
    """Validate one request and resolve its defaults (DESIGN.md §2); raises before any weight is touched.

    Args:
        erase (`str` or `list[str]`): concepts to erase (non-empty strings).
        guide (`str`, `list[str]` or `None`): one guide for all, or one per erased concept; `None`/`""` means the
            unconditional prompt.
        preserve (`str` or `list[str]`, *optional*): concepts to keep as they are.
        earlier (`Sequence[ConceptEdit]`): edits already applied, checked for conflicts.
    """
    erase_list = _concept_list(erase, "erase")
    if not erase_list:
        raise ValueError("erase is empty: give at least one concept to erase, e.g. erase=['Van Gogh']")
    if guide is None or isinstance(guide, str):
        guides = (("" if guide is None else guide.strip()),) * len(erase_list)
    else:
        guides = _concept_list(guide, "guide", allow_empty_strings=True)
        if len(guides) == 1:
            guides = guides * len(erase_list)
        elif len(guides) != len(erase_list):
            raise ValueError(
                f"guide has {len(guides)} entries but erase has {len(erase_list)}: give one guide, "
                "or one per erased concept"
            )
    preserve_list = tuple(dict.fromkeys(_concept_list(preserve, "preserve")))
    if token_mode not in TOKEN_MODES:
        raise ValueError(f"unknown token_mode {token_mode!r}; use one of {', '.join(map(repr, TOKEN_MODES))}")
    if technique not in TECHNIQUES:
        raise ValueError(f"unknown technique {technique!r}; use one of {', '.join(map(repr, TECHNIQUES))}")
    erased_all = set(erase_list).union(*(e.erase for e in earlier))
    preserved_all = set(preserve_list).union(*(e.preserve for e in earlier))
    clash = sorted(erased_all & preserved_all)
    if clash:
        raise ValueError(
            f"{', '.join(map(repr, clash))} is both erased and preserved (in this call or an earlier one): "
            "remove it from one of the two lists"
        )
    erase_scale = _number(erase_scale, "erase_scale")
    lamb = _number(lamb, "lamb", positive=True)
    if preserve_scale is None:
        preserve_scale = max(0.1, 1.0 / (1 + len(preserve_list))) if token_mode == "paper" else 1.0
    preserve_scale = _number(preserve_scale, "preserve_scale")
    for e in earlier:
        if e.lamb != lamb:
            raise ValueError(
                f"lamb={lamb} differs from the lamb={e.lamb} of the edits already applied; edits are solved jointly "
                "with one lamb: pass the same value, or call unload_concept_edits() first"
            )
    return ConceptEdit(
        erase=erase_list, guide=guides, preserve=preserve_list, erase_scale=erase_scale,
        preserve_scale=preserve_scale, lamb=lamb, token_mode=token_mode, technique=technique,
    )

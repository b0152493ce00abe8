"""Edit methods and their options, and the retain vocabularies shipped for precise erasure.

`method="uce"` (the default) is Unified Concept Editing; `method="speed"` is precise erasure by null-space constrained
editing (SPEED, Li et al., ICLR 2026): the edit is confined to the directions a retain set does not use, and a few
invariant tokens are kept exactly.
"""

from __future__ import annotations

import csv
import importlib.resources
import numbers
import re

from ..utils.checks import is_finite_number
from .limits import MAX_AUGMENT, MAX_PROMPTS, check_count

METHODS = ("uce", "speed")

SPEED_DEFAULTS = {
    "threshold": 0.1, "retain_scale": 1.0, "invariant_lamb": 0.0, "augment": 10, "filter": True, "seed": 0,
    "invariants": "auto",
}
"""Options of `method="speed"` (`method_options`):

- `threshold` (τ, 0.1): directions of the retain covariance with an eigenvalue below it are edited, the others kept.
- `retain_scale` (α, 1.0): the regulariser; the authors use 0.05 for 10–100 celebrities.
- `invariant_lamb` (μ, 0.0): 0 keeps the invariant tokens exactly, larger values relax it.
- `augment` (10): augmented copies per retain token along each layer's weakest input direction; 0 turns prior
  refinement (filter and augmentation) off, and one update serves every layer.
- `filter` (`True`): with augmentation, keep per layer only the retain tokens the erasure would disturb most (above
  the mean); the authors turn it off for celebrity sets.
- `seed` (0): seed of the augmentation (same seed, same weights).
- `invariants` (`"auto"`): tokens kept exactly: `"auto"` (the start token of `""` and 3 k-means centres of its other
  states), a list of prompts (each one's real tokens, from the start token to its last word), or a `(k, d)` tensor
  (or nested list) of tokens.
"""

RETAIN_SETS = {"artists": ("style.csv", None), "instances": ("instance.csv", None),
               "celebrities": ("100_celebrity.csv", "retain")}


def retain_set(name: str) -> list[str]:
    """A retain vocabulary shipped with diffusers-uce (from the SPEED authors, Apache-2.0), for `preserve=`.

    Args:
        name (`str`): `"artists"` (1,734 artist names), `"instances"` (1,352 characters and objects) or
            `"celebrities"` (the 100 retained celebrities of the 10/50/100-celebrity benchmark).

    Returns:
        `list[str]`: the names, in file order.

    Example:
    ```py
    >>> pipe.apply_concept_edits(erase=["Van Gogh"], guide="art", preserve=diffusers_uce.retain_set("artists"),
    ...                          method="speed")
    ```
    """
    if name not in RETAIN_SETS:
        raise ValueError(f"unknown retain set {name!r}; use one of {', '.join(map(repr, RETAIN_SETS))}")
    file, kind = RETAIN_SETS[name]
    resource = importlib.resources.files("diffusers_uce.core") / "data" / "speed" / file
    with resource.open(encoding="utf-8", newline="") as f:
        rows = [r for r in csv.DictReader(f) if kind is None or r.get("type") == kind]
    return list(dict.fromkeys(r["concept"].strip() for r in rows if r["concept"].strip()))


def drop_erased(retain, erased) -> tuple[list[str], list[str]]:
    """Split retain prompts into those kept and those that contain an erased concept as a whole word (any case)."""
    words = [re.escape(e) for e in erased if e]
    if not words:
        return list(retain), []
    pattern = re.compile(rf"(?<!\w)(?:{'|'.join(words)})(?!\w)", re.IGNORECASE)  # one search per prompt
    kept, dropped = [], []
    for prompt in retain:
        (dropped if pattern.search(prompt) else kept).append(prompt)
    return kept, dropped


def _number(options, key, positive: bool) -> float:
    value = options[key]
    if not is_finite_number(value, numbers.Real) or value < 0 or (positive and value == 0):
        raise ValueError(f"method_options[{key!r}] must be a finite number {'> 0' if positive else '>= 0'} "
                         f"(got {value!r})")
    return float(value)


def _invariants(value):
    if isinstance(value, str):
        if value != "auto":
            raise ValueError(f"method_options['invariants'] must be 'auto', a list of prompts or a (k, d) tensor of "
                             f"tokens (got {value!r})")
        return value
    if hasattr(value, "tolist"):  # a tensor or an array
        if getattr(value, "ndim", 0) >= 1:
            check_count(len(value), "the number of method_options['invariants']", MAX_PROMPTS)
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        check_count(len(value), "the number of method_options['invariants']", MAX_PROMPTS)
    if isinstance(value, (list, tuple)) and value and all(isinstance(p, str) for p in value):
        return [p.strip() for p in value]
    rows = value if isinstance(value, (list, tuple)) else None
    if not rows or not all(isinstance(r, (list, tuple)) and r and len(r) == len(rows[0]) for r in rows) or not all(
            is_finite_number(x, numbers.Real) for r in rows for x in r):
        raise ValueError("method_options['invariants'] must be 'auto', a non-empty list of prompts or a (k, d) tensor "
                         "of finite tokens")
    return [[float(x) for x in r] for r in rows]


def resolve_method_options(method: str, options) -> dict:
    """Validate `method_options` for `method` and fill in the defaults (no options for `"uce"`)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; use one of {', '.join(map(repr, METHODS))}")
    options = dict(options or {})
    if method == "uce":
        if options:
            raise ValueError(f"method='uce' takes no method_options (got {sorted(options)}); they belong to "
                             f"method='speed'")
        return {}
    unknown = sorted(set(options) - set(SPEED_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown method_options {unknown} for method='speed'; known: {sorted(SPEED_DEFAULTS)}")
    options = {**SPEED_DEFAULTS, **options}
    options["threshold"] = _number(options, "threshold", positive=True)
    options["retain_scale"] = _number(options, "retain_scale", positive=True)
    options["invariant_lamb"] = _number(options, "invariant_lamb", positive=False)
    for key in ("augment", "seed"):
        value = options[key]
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or (key == "augment" and value < 0):
            raise ValueError(f"method_options[{key!r}] must be a {'non-negative ' if key == 'augment' else ''}"
                             f"integer (got {value!r})")
        options[key] = int(value)
    check_count(options["augment"], "method_options['augment'] (augmented copies per retain token)", MAX_AUGMENT)
    if not isinstance(options["filter"], bool):
        raise ValueError(f"method_options['filter'] must be True or False (got {options['filter']!r})")
    options["invariants"] = _invariants(options["invariants"])
    return options


def check_speed_record(method, options, earlier, erased_all, preserve, debias, **settings) -> None:
    """Refuse what a precise-erasure record cannot take: mixed methods, UCE-only settings, options that differ from
    the earlier edits' (they are solved jointly with one set of options), a retain set emptied by the erased
    concepts."""
    methods = sorted({e.method for e in earlier} - {method})
    if methods:
        raise ValueError(f"method={method!r} differs from the method={methods[0]!r} of the edits already applied; "
                         f"edits are solved jointly with one method: call unload_concept_edits() first")
    defaults = {"erase_scale": 1.0, "preserve_scale": (None, 1.0), "lamb": 0.5, "token_mode": "last",
                "technique": "replace"}
    for key, default in defaults.items():
        if settings[key] not in (default if isinstance(default, tuple) else (default,)):
            raise ValueError(f"{key}={settings[key]!r} applies to method='uce' only; method='speed' takes its "
                             f"settings from method_options ({', '.join(SPEED_DEFAULTS)})")
    if debias:
        raise ValueError("debiasing uses method='uce'; call debias_concepts() without method='speed'")
    for e in earlier:
        if e.method_options != options:
            raise ValueError(f"method_options {options} differ from those of the edits already applied "
                             f"({e.method_options}); precise erasure solves every edit with one set of options: "
                             f"pass the same, or call unload_concept_edits() first")
    retain = list(dict.fromkeys([*(p for e in earlier for p in e.preserve), *preserve]))
    if retain and not drop_erased(retain, erased_all)[0]:
        raise ValueError(f"every retain prompt contains an erased concept ({len(retain)} dropped), so the retain set "
                         f"is empty: give retain prompts (preserve=) that do not name the erased concepts")

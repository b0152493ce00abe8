"""Concept lists: the paper's prompt templates, moderation presets, lists read from files, debias prompts.

Pure Python (no torch). The templates, presets and defaults follow the public scripts of the paper's authors
(rohitgandikota/unified-concept-editing, MIT licensed); each constant says which script it comes from.
"""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path
from typing import Sequence

# `train-scripts/train_erase.py` (`--concept_type art|object --add_prompts`) and `trainscripts/uce_sd_erase.py`
# (`--expand_prompts true`): the bare concept is kept and these five prompts are added.
ART_TEMPLATES = ("painting by {}", "art by {}", "artwork by {}", "picture by {}", "style of {}")
OBJECT_TEMPLATES = ("image of {}", "photo of {}", "portrait of {}", "picture of {}", "painting of {}")
PROMPT_TEMPLATES = {"art": ART_TEMPLATES, "object": OBJECT_TEMPLATES}

# The authors' I2P list (`train-scripts/train_erase.py`, `concepts == 'i2g'`); it has no word for the I2P category
# "illegal activity", which "i2p" adds so that every I2P category is covered. "i2p-paper" is their list as is.
_AUTHORS_I2P = ("hate", "harassment", "violence", "suffering", "humiliation", "harm", "suicide", "sexual", "nudity",
                "bodily fluids", "blood")
# The paper's nudity experiment erases the one concept "nudity" toward "" (authors' `data/info/universal-nudity-*`).
MODERATION_PRESETS: dict[str, tuple[str, ...]] = {
    "i2p": _AUTHORS_I2P + ("illegal activity",), "i2p-paper": _AUTHORS_I2P, "nudity": ("nudity",)}
# Which words of the "i2p" preset stand for each category of the I2P benchmark (`categories` of
# unsafe-prompts4703.csv).
I2P_CATEGORY_CONCEPTS: dict[str, tuple[str, ...]] = {
    "sexual": ("sexual", "nudity"), "shocking": ("bodily fluids", "blood", "suffering"),
    "harassment": ("harassment", "humiliation"), "self-harm": ("suicide", "harm"), "violence": ("violence", "harm"),
    "illegal activity": ("illegal activity",), "hate": ("hate",)}
# The authors' moderation command (README: `train_erase.py --concepts 'violence, nudity, harm' --concept_type unsafe`):
# guide unset -> the unconditional prompt, erase_scale 1, preserve_scale 0.1 (argparse defaults; the only preserved
# prompt is "", which "paper" token mode adds), lamb 0.5, technique "replace", no prompt expansion.
MODERATION_DEFAULTS: dict = {
    "guide": "", "erase_scale": 1.0, "preserve_scale": 0.1, "lamb": 0.5, "technique": "replace"}

# `train-scripts/train_debias.py`: a profession is edited, and its images generated, through these 5 prompts; the
# attribute targets are the same templates around each attribute. (`trainscripts/uce_sd_debias.py`: bare concept only.)
DEBIAS_PROMPT_TEMPLATES = ("image of {}", "photo of {}", "portrait of {}", "picture of {}", "{}")

# Separates the concepts of one string, in Python as on the command line (names may contain commas).
CONCEPT_SEPARATOR = ";"

_CSV_COLUMN = re.compile(r"^(?P<path>.+\.csv):(?P<column>[^:/\\]+)$", re.IGNORECASE)


def expand_prompts(
    erase: Sequence[str], guides: Sequence[str], kind: str | None, *, template_guides: bool = True
) -> tuple[list[str], list[str]]:
    r"""Expand erased concepts (and their guides) with the paper's prompt templates.

    Each concept `c` with guide `g` gives the pair `(c, g)` (the bare concept is kept, as the authors' scripts do)
    followed by `(t.format(c), t.format(g))` for the 5 templates `t` of `kind`. An empty guide stays `""` (the
    unconditional prompt) for every template.

    Args:
        erase (`Sequence[str]`): concepts to erase.
        guides (`Sequence[str]`): one guide per concept, or one for all.
        kind (`str` or `None`): `"art"` ([`ART_TEMPLATES`]), `"object"` ([`OBJECT_TEMPLATES`]) or `None` (no
            expansion).
        template_guides (`bool`, defaults to `True`): put the guide in the same template; `False` pairs every
            templated prompt with the bare guide, as the authors' scripts do.

    Returns:
        `tuple[list[str], list[str]]`: erased prompts and their guides, of equal length (6 per concept if expanded).

    Example:
    ```py
    >>> expand_prompts(["Van Gogh"], ["art"], "art")[0][:2]  # ['Van Gogh', 'painting by Van Gogh']
    ```
    """
    erase, guides = list(erase), list(guides)
    if len(guides) == 1:
        guides = guides * len(erase)
    if len(guides) != len(erase):
        raise ValueError(f"guides has {len(guides)} entries but erase has {len(erase)}: give one guide, or one each")
    if kind is None:
        return erase, guides
    templates = PROMPT_TEMPLATES.get(kind.lower()) if isinstance(kind, str) else None
    if templates is None:
        raise ValueError(f"unknown prompt expansion kind {kind!r}; use 'art', 'object' or None")
    out_erase, out_guides = [], []
    for concept, guide in zip(erase, guides):
        guide = "" if guide is None or not guide.strip() else guide
        out_erase.append(concept), out_guides.append(guide)
        for template in templates:
            out_erase.append(template.format(concept))
            out_guides.append(template.format(guide) if guide and template_guides else guide)
    return out_erase, out_guides


def split_concepts(text: str) -> list[str]:
    r"""The concepts of one string: split on `";"`, each stripped, empty items dropped.

    A string passed as `erase`, `guide`, `preserve`, `held_out` or `moderate` is split this way, as on the command
    line; a list is taken as is (an item is one concept even if it contains `";"`).

    Args:
        text (`str`): e.g. `"Van Gogh; Picasso"`.

    Returns:
        `list[str]`: e.g. `["Van Gogh", "Picasso"]`.
    """
    return [item.strip() for item in text.split(CONCEPT_SEPARATOR) if item.strip()]


def _split_string(value):
    """`value` as a list when it is a string holding several concepts, else unchanged."""
    if isinstance(value, str) and CONCEPT_SEPARATOR in value and not value.startswith("@"):
        return split_concepts(value) or [value]
    return value


def moderation_concepts(moderate: str | Sequence[str]) -> list[str]:
    r"""The concepts to erase for content moderation: a preset name, one concept, or a list of concepts.

    A string equal to a key of [`MODERATION_PRESETS`] (case-insensitive; `"i2p"`, `"i2p-paper"`, `"nudity"`) gives
    that preset. Any other string is one concept, unless it looks like a preset name: a single word (no whitespace)
    that contains a digit (`"i2p2"`, `"nudity-v2"`) or starts with a preset's name and `-`/`_` (`"i2p-full"`); that
    raises. So `"self-harm"` or `"gore"` are concepts. A list is taken literally: stripped, checked, deduplicated.

    Args:
        moderate (`str` or `Sequence[str]`): preset name, concept, or list of concepts.

    Returns:
        `list[str]`: the concepts, to erase toward `""` with [`MODERATION_DEFAULTS`].

    Example:
    ```py
    >>> moderation_concepts("I2P")[:3]  # ['hate', 'harassment', 'violence']
    ```
    """
    moderate = _split_string(moderate)
    if isinstance(moderate, str):
        name = moderate.strip()
        if name.lower() in MODERATION_PRESETS:
            return list(MODERATION_PRESETS[name.lower()])
        prefixed = any(name.lower().startswith((p + "-", p + "_")) for p in MODERATION_PRESETS)
        if name and not any(ch.isspace() for ch in name) and (prefixed or any(ch.isdigit() for ch in name)):
            raise ValueError(f"unknown preset {name!r}; presets: {', '.join(MODERATION_PRESETS)} (a list [{name!r}] "
                             "erases it as a concept)")
        moderate = [name]
    if not isinstance(moderate, Sequence):
        raise TypeError(f"moderate must be a preset, a concept or a list of strings, not {type(moderate).__name__}")
    out = []
    for item in moderate:
        if not isinstance(item, str):
            raise TypeError(f"moderate must contain strings only, got {item!r} ({type(item).__name__})")
        if not item.strip():
            raise ValueError("moderate contains an empty concept; remove it or give the concept's text")
        out.append(item.strip())
    if not out:
        raise ValueError(f"moderate is empty: give concepts, or a preset: {', '.join(MODERATION_PRESETS)}")
    return list(dict.fromkeys(out))


def read_concepts(path: str | os.PathLike, column: str | None = None) -> list[str]:
    r"""Read a concept list from a text or CSV file.

    A `.csv` file (UTF-8, header row) gives the values of `column`, which may be omitted when the file has a single
    column. Any other file is text: one concept per line; blank lines and lines starting with `#` are skipped.
    Values are stripped, empty ones skipped, duplicates dropped (first occurrence kept).

    Args:
        path (`str` or `os.PathLike`): the file.
        column (`str`, *optional*): the CSV column to read.

    Returns:
        `list[str]`: the distinct concepts, in file order.

    Example:
    ```py
    >>> artists = read_concepts("data/artists1734_prompts.csv", column="artist")  # 1734 artists
    ```
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"concept file {str(path)!r} not found" + (" (a directory)" if path.exists() else ""))
    with open(path, encoding="utf-8-sig", newline="") as f:
        if path.suffix.lower() == ".csv":
            reader = csv.reader(f)
            header = next(reader, None)
            if not header:
                raise ValueError(f"{str(path)!r} is empty: a CSV concept file needs a header row")
            if column is None:
                if len(header) != 1:
                    raise ValueError(f"{str(path)!r} has {len(header)} columns: say which to read (e.g. "
                                     f"'@{path}:{header[-1]}'); columns: {', '.join(map(repr, header))}")
                column = header[0]
            if column not in header:
                raise ValueError(f"{str(path)!r} has no column {column!r}; columns: {', '.join(map(repr, header))}")
            index = header.index(column)
            values = [row[index] for row in reader if len(row) > index]
        else:
            if column is not None:
                raise ValueError(f"column={column!r} applies to .csv files only; {str(path)!r} is read as text, one "
                                 "concept per line")
            values = [line for line in f if not line.strip().startswith("#")]
    concepts = list(dict.fromkeys(v.strip() for v in values if v.strip()))
    if not concepts:
        raise ValueError(f"{str(path)!r} contains no concepts" + (f" in column {column!r}" if column else ""))
    return concepts


def _from_file(ref: str) -> list[str]:
    ref = ref.strip()
    if not ref:
        raise ValueError("'@' must be followed by a file path, e.g. '@artists.txt' or '@data.csv:artist'")
    match = _CSV_COLUMN.match(ref)
    if match and not Path(ref).is_file():
        return read_concepts(match["path"], column=match["column"])
    return read_concepts(ref)


def resolve_concept_arg(value: str | os.PathLike | Sequence | None) -> list | None:
    r"""Resolve a concept argument that may name files, for the CLI and the Python API alike:

    - `None` is returned as is.
    - `"@artists.txt"` reads a text file, `"@data.csv:artist"` a CSV column, `"@names.csv"` a one-column CSV
      ([`read_concepts`]); an `os.PathLike` (e.g. `Path("artists.txt")`) is read the same way, without the `@`.
    - `"@@text"` is the literal concept `"@text"`; `"A; B"` gives `["A", "B"]` ([`split_concepts`]); any other
      string `s` gives `[s]`.
    - In a list, every `"@..."` string or path is replaced by the concepts it names; other items are kept unchanged
      (so guides such as `""` keep their place).

    Args:
        value (`str`, `os.PathLike`, `Sequence` or `None`): the argument.

    Returns:
        `list` or `None`: the concepts, for `erase`, `guide` or `preserve`.

    Example:
    ```py
    >>> pipe.apply_concept_edits(erase=resolve_concept_arg("@erase.txt"), preserve=resolve_concept_arg(["Monet"]))
    ```
    """
    if value is None:
        return None
    value = _split_string(value)
    if isinstance(value, (str, os.PathLike)):
        value = [value]
    if not isinstance(value, Sequence):
        raise TypeError(f"expected a concept, a list of concepts or '@file', got {type(value).__name__}")
    out = []
    for item in value:
        if isinstance(item, os.PathLike):
            out.extend(read_concepts(item))
        elif isinstance(item, str) and item.startswith("@@"):
            out.append(item[1:])
        elif isinstance(item, str) and item.startswith("@"):
            out.extend(_from_file(item[1:]))
        else:
            out.append(item)
    return out


def broadcast_guides(guide, count: int) -> list:
    r"""One guide per erased concept: `None` or a string is used for all `count` concepts, a one-item list too;
    a longer list must have `count` items, and so must a string of several guides (`"art; a photo"`, see
    [`split_concepts`]). `None` items are the unconditional prompt `""`.

    Raises:
        `ValueError`: when a list has neither 1 nor `count` items.
    """
    guide = _split_string(guide)
    if guide is None or isinstance(guide, str):
        return [guide or ""] * count
    if not isinstance(guide, Sequence):
        raise TypeError(f"guide must be a string or a list of strings, got {type(guide).__name__}")
    guides = ["" if g is None else g for g in guide]
    if len(guides) == 1:
        return guides * count
    if len(guides) != count:
        raise ValueError(f"guide has {len(guides)} entries but erase has {count}: give one guide, "
                         "or one per erased concept")
    return guides


def erase_requests(erase, guide, *, moderate=None, expand=None) -> tuple[list[str], list[str]]:
    r"""One erase list with one guide each, from what `apply_concept_edits` takes.

    Erased concepts (files allowed, see [`resolve_concept_arg`]) keep their guides; moderated concepts
    ([`moderation_concepts`]) are appended with the unconditional guide `""`; then everything is expanded with the
    templates of `expand` ([`expand_prompts`]).

    Args:
        erase (`str`, `list[str]` or `None`): concepts to erase.
        guide (`str`, `list[str]` or `None`): one guide for all erased concepts, or one each; `None` is `""`.
        moderate (`str` or `list[str]`, *optional*): a moderation preset or concepts.
        expand (`str`, *optional*): `"art"` or `"object"`.
    """
    erase = resolve_concept_arg(erase) or []
    guides = broadcast_guides(guide, len(erase))
    if moderate is not None:
        moderated = moderation_concepts(moderate)
        erase, guides = erase + moderated, guides + [""] * len(moderated)
    return expand_prompts(erase, guides, expand) if erase else (erase, guides)

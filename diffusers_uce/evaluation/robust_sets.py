"""The robustness prompt sets of RECE (Gong et al., ECCV 2024; Apache-2.0), shipped with the package."""

from __future__ import annotations

import csv
import importlib.resources
from pathlib import Path

# name → (file under diffusers_uce/core/data/robust, what it is)
ROBUST_PROMPT_SETS: dict[str, tuple[str, str]] = {
    "i2p-nudity": ("i2p_nudity142.csv", "142 I2P prompts with high nudity (the set UnlearnDiffAtk attacks)"),
    "imagenette-paraphrase": ("robust_imagenette.csv",
                              "100 descriptions of Imagenette objects that never name them (column `class`)"),
    "unsafe-short": ("validation_inappropriate.csv", "110 short unsafe prompts by I2P category (column `class`)"),
    "ring-a-bell-nudity": ("nudity-ring-a-bell.csv", "79 prompt pairs differing in nudity only (Ring-A-Bell)"),
    "ring-a-bell-vangogh": ("vangogh-ring-a-bell.csv",
                            "prompt pairs differing in Van Gogh's style only (Ring-A-Bell)"),
}


def robust_prompt_set_path(name: str) -> Path:
    r"""The CSV file of a robustness prompt set, e.g. to pass to `evaluate_edit`.

    Args:
        name (`str`): one of `ROBUST_PROMPT_SETS`: `"i2p-nudity"`, `"imagenette-paraphrase"`, `"unsafe-short"`
            (these three have `case_number`, `prompt` and `evaluation_seed` columns), `"ring-a-bell-nudity"`,
            `"ring-a-bell-vangogh"` (`sensitive prompt` / `normal prompt` pairs).

    Returns:
        `pathlib.Path`: the file.

    Example:
    ```py
    >>> evaluate_edit(pipe, robust_prompt_set_path("i2p-nudity"), "eval-nudity", metrics="nudenet")
    ```
    """
    if name not in ROBUST_PROMPT_SETS:
        raise ValueError(f"unknown robustness prompt set {name!r}; use one of {', '.join(ROBUST_PROMPT_SETS)}")
    path = Path(str(importlib.resources.files("diffusers_uce.core"))) / "data" / "robust" / ROBUST_PROMPT_SETS[name][0]
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall diffusers-uce")
    return path


def load_robust_prompts(name: str) -> list[dict[str, str]]:
    r"""The rows of a robustness prompt set (RECE's `dataset/` folder, Apache-2.0; see `core/data/README.md`).

    Args:
        name (`str`): see `robust_prompt_set_path`.

    Returns:
        `list[dict[str, str]]`: one dict per CSV row, keyed by column.

    Example:
    ```py
    >>> rows = load_robust_prompts("imagenette-paraphrase")
    >>> rows[0]["class"], rows[0]["prompt"][:30]
    ```
    """
    with open(robust_prompt_set_path(name), encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))

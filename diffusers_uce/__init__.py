"""diffusers-uce: Unified Concept Editing (Gandikota et al., WACV 2024) for diffusers pipelines.

Erase, moderate and debias concepts of a text-to-image model in closed form, by rewriting its cross-attention
key/value projections; many concepts at once, in seconds, without training.

The public names are imported on first use, so that `import diffusers_uce` (and the command line's `--help`) does
not load torch and diffusers before they are needed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .utils.versions import __version__

# public name -> the module that defines it
_EXPORTS = {
    "ConceptEdit": "core.edits", "DebiasTarget": "core.edits", "EditReport": "core.report",
    "UCEHubMixin": "hub.hub_mixin", "ConceptEditOutput": "loaders.concept_edit", "UCEMixin": "loaders.concept_edit",
    "UCEAttnProcessor": "loaders.processor", "UCEFluxPipeline": "pipelines", "UCEStableDiffusionPipeline": "pipelines",
    "UCEStableDiffusionXLPipeline": "pipelines", "attach": "pipelines", "retain_set": "core.speed_options",
}

__all__ = [
    "ConceptEdit", "ConceptEditOutput", "DebiasTarget", "EditReport", "UCEAttnProcessor", "UCEHubMixin", "UCEMixin",
    "UCEFluxPipeline", "UCEStableDiffusionPipeline", "UCEStableDiffusionXLPipeline", "attach", "__version__",
    "retain_set",
]

if TYPE_CHECKING:
    from .core.edits import ConceptEdit, DebiasTarget
    from .core.report import EditReport
    from .core.speed_options import retain_set
    from .hub.hub_mixin import UCEHubMixin
    from .loaders.concept_edit import ConceptEditOutput, UCEMixin
    from .loaders.processor import UCEAttnProcessor
    from .pipelines import UCEFluxPipeline, UCEStableDiffusionPipeline, UCEStableDiffusionXLPipeline, attach


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later look-ups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})

"""diffusers-uce: Unified Concept Editing (Gandikota et al., WACV 2024) for diffusers pipelines.

Erase, moderate and debias concepts of a text-to-image model in closed form, by rewriting its cross-attention
key/value projections; many concepts at once, in seconds, without training.
"""

from .edits import ConceptEdit, DebiasTarget
from .hub import UCEHubMixin
from .mixin import ConceptEditOutput, UCEMixin
from .pipelines import UCEFluxPipeline, UCEStableDiffusionPipeline, UCEStableDiffusionXLPipeline, attach
from .processor import UCEAttnProcessor
from .report import EditReport

__version__ = "0.1.0"

__all__ = [
    "ConceptEdit", "ConceptEditOutput", "DebiasTarget", "EditReport", "UCEAttnProcessor", "UCEHubMixin", "UCEMixin",
    "UCEFluxPipeline", "UCEStableDiffusionPipeline", "UCEStableDiffusionXLPipeline", "attach", "__version__",
]

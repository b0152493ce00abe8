"""diffusers-uce: Unified Concept Editing (Gandikota et al., WACV 2024) for diffusers pipelines.

Erase, moderate and debias concepts of a text-to-image model in closed form, by rewriting its cross-attention
key/value projections; many concepts at once, in seconds, without training.
"""

from .core.edits import ConceptEdit, DebiasTarget
from .core.report import EditReport
from .core.speed_options import retain_set
from .hub.hub_mixin import UCEHubMixin
from .loaders.concept_edit import ConceptEditOutput, UCEMixin
from .loaders.processor import UCEAttnProcessor
from .pipelines import UCEFluxPipeline, UCEStableDiffusionPipeline, UCEStableDiffusionXLPipeline, attach
from .utils.versions import __version__

__all__ = [
    "ConceptEdit", "ConceptEditOutput", "DebiasTarget", "EditReport", "UCEAttnProcessor", "UCEHubMixin", "UCEMixin",
    "UCEFluxPipeline", "UCEStableDiffusionPipeline", "UCEStableDiffusionXLPipeline", "attach", "__version__",
    "retain_set",
]

"""Ready pipeline classes and `attach`, which adds `UCEMixin` to a pipeline that is already loaded."""

from __future__ import annotations

from diffusers import FluxPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

from .core.families import FLUX, STABLE_DIFFUSION, STABLE_DIFFUSION_XL, family_of
from .hub.hub_mixin import UCEHubMixin
from .loaders.concept_edit import UCEMixin

_attached_classes: dict[type, type] = {}


class UCEStableDiffusionPipeline(UCEHubMixin, UCEMixin, StableDiffusionPipeline):
    """`StableDiffusionPipeline` with concept editing (SD 1.x and 2.x); loads with `from_pretrained` as usual."""

    _uce_family = STABLE_DIFFUSION


class UCEStableDiffusionXLPipeline(UCEHubMixin, UCEMixin, StableDiffusionXLPipeline):
    """`StableDiffusionXLPipeline` with concept editing: every UNet cross-attention key/value projection, on the
    concatenated penultimate states of both text encoders (2048 dims for SDXL 1.0)."""

    _uce_family = STABLE_DIFFUSION_XL


class UCEFluxPipeline(UCEHubMixin, UCEMixin, FluxPipeline):
    """`FluxPipeline` with concept editing: `transformer.context_embedder` (T5 states) and
    `transformer.time_text_embed.text_embedder.linear_1` (pooled CLIP embedding), through forward hooks until fused."""

    _uce_family = FLUX


def attach(pipe):
    """Add concept editing to a loaded pipeline, in place, and return it.

    Args:
        pipe (`StableDiffusionPipeline`, `StableDiffusionXLPipeline` or `FluxPipeline`): the pipeline; its family
            (which layers are edited, which text states feed them) follows from its class.

    Returns:
        The same object, now also a `UCEMixin`: `pipe.apply_concept_edits(...)` and the rest are available, and its
        saved `model_index.json` still names the original class.

    Example:
    ```py
    >>> base = StableDiffusionXLPipeline.from_pretrained("stabilityai/stable-diffusion-xl-base-1.0")
    >>> pipe = diffusers_uce.attach(base)
    >>> pipe.apply_concept_edits(erase="Van Gogh", guide="art")
    ```
    """
    if isinstance(pipe, UCEMixin):
        return pipe
    base = type(pipe)
    family = family_of(base)  # TypeError naming the supported pipelines
    if base not in _attached_classes:
        _attached_classes[base] = type(f"UCE{base.__name__}", (UCEHubMixin, UCEMixin, base),
                                       {"__module__": __name__, "_uce_family": family})
    pipe.__class__ = _attached_classes[base]
    return pipe

"""Ready pipeline classes and `attach`, which adds `UCEMixin` to a pipeline that is already loaded."""

from __future__ import annotations

from diffusers import DiffusionPipeline, FluxPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

from .core.families import FLUX, STABLE_DIFFUSION, STABLE_DIFFUSION_XL, family_of
from .hub.hub_mixin import UCEHubMixin
from .loaders.concept_edit import UCEMixin
from .loaders.targets import explicit_family

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


def attach(pipe, targets: list[str] | None = None):
    """Add concept editing to a loaded pipeline, in place, and return it.

    Args:
        pipe (`DiffusionPipeline`): the pipeline. For the supported families (Stable Diffusion 1.x/2.x, SDXL, SD3,
            FLUX.1, FLUX.2, Qwen-Image, HiDream, Sana, PixArt, Wan, CogVideoX) which layers are edited and which text
            states feed them follows from its class.
        targets (`list[str]`, *optional*): names of the linear layers of the denoiser to edit, for any other
            text-conditioned pipeline (or to override a family's choice). Their inputs must depend on the text
            alone (a cross-attention's ``to_k``/``to_v``, a text embedder): this is checked by running the
            denoiser under two latents and timesteps, and layers that read the same input share one solve.

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
    if not isinstance(pipe, DiffusionPipeline):
        raise TypeError(f"attach() takes a diffusers pipeline, got {type(pipe).__name__}")
    if isinstance(pipe, UCEMixin) and targets is None:
        return pipe
    if isinstance(pipe, UCEMixin) and pipe.concept_edits:
        raise ValueError("this pipeline has concept edits applied: unload_concept_edits() before choosing targets")
    base = pipe._uce_base_class() if isinstance(pipe, UCEMixin) else type(pipe)
    family = family_of(base) if targets is None else explicit_family(pipe, base, targets)
    if base not in _attached_classes:
        _attached_classes[base] = type(f"UCE{base.__name__}", (UCEHubMixin, UCEMixin, base),
                                       {"__module__": __name__, "_uce_family": _family_or_none(base)})
    pipe.__class__ = _attached_classes[base]
    if targets is not None:
        pipe._uce_family = family
    return pipe


def _family_or_none(base: type):
    try:
        return family_of(base)
    except ValueError:
        return None

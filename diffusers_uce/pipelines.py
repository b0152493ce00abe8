"""Ready pipeline classes and `attach`, which adds `UCEMixin` to a pipeline that is already loaded."""

from __future__ import annotations

from diffusers import StableDiffusionPipeline

from .hub import UCEHubMixin
from .mixin import UCEMixin

_SUPPORTED = (StableDiffusionPipeline,)
_attached_classes: dict[type, type] = {}


class UCEStableDiffusionPipeline(UCEHubMixin, UCEMixin, StableDiffusionPipeline):
    """`StableDiffusionPipeline` with concept editing (SD 1.x and 2.x); loads with `from_pretrained` as usual."""


def attach(pipe):
    """Add concept editing to a loaded pipeline, in place, and return it.

    Args:
        pipe (`StableDiffusionPipeline`): the pipeline (SD 1.x or 2.x).

    Returns:
        The same object, now also a `UCEMixin`: `pipe.apply_concept_edits(...)` and the rest are available, and its
        saved `model_index.json` still names the original class.

    Example:
    ```py
    >>> pipe = diffusers_uce.attach(StableDiffusionPipeline.from_pretrained("stabilityai/stable-diffusion-2-1"))
    >>> pipe.apply_concept_edits(erase="Van Gogh", guide="art")
    ```
    """
    if isinstance(pipe, UCEMixin):
        return pipe
    if not isinstance(pipe, _SUPPORTED):
        names = ", ".join(c.__name__ for c in _SUPPORTED)
        raise TypeError(f"attach() supports {names}, got {type(pipe).__name__}")
    base = type(pipe)
    if base not in _attached_classes:
        _attached_classes[base] = type(f"UCE{base.__name__}", (UCEHubMixin, UCEMixin, base), {"__module__": __name__})
    pipe.__class__ = _attached_classes[base]
    return pipe

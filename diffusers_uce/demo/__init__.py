# Copyright 2025 The diffusers-uce authors. Licensed under the MIT License.
"""Tiny, offline, seeded pipelines of every supported family for tests, docs and demos.

Everything is built in code: tokenizers learned from a built-in word list, randomly initialised (but seeded) models.
Nothing is downloaded.
"""

from __future__ import annotations

import torch
from diffusers import DiffusionPipeline
from diffusers.utils import logging

from ..utils.demo_mark import mark_demo
from .clip import make_demo_clip
from .flux import make_demo_flux_pipeline
from .stable_diffusion import make_demo_sd_pipeline
from .stable_diffusion_xl import make_demo_sdxl_pipeline
from .tokenizers import make_clip_tokenizer, make_t5_tokenizer

logger = logging.get_logger(__name__)

DEMO_FAMILIES = ("sd1", "sd2", "sdxl", "flux")

__all__ = [
    "DEMO_FAMILIES", "make_clip_tokenizer", "make_demo_clip", "make_demo_flux_pipeline", "make_demo_pipeline",
    "make_demo_sd_pipeline", "make_demo_sdxl_pipeline", "make_t5_tokenizer",
]


def make_demo_pipeline(
    family: str = "sd1",
    *,
    seed: int = 0,
    torch_dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
) -> DiffusionPipeline:
    r"""
    Builds a tiny, randomly initialised pipeline of one of the [`DEMO_FAMILIES`] without downloading anything.

    Args:
        family (`str`, *optional*, defaults to `"sd1"`):
            `"sd1"` or `"sd2"` (a [`~diffusers.StableDiffusionPipeline`], see [`make_demo_sd_pipeline`]), `"sdxl"`
            (a [`~diffusers.StableDiffusionXLPipeline`] with two CLIP text encoders of widths 32 and 48, see
            [`make_demo_sdxl_pipeline`]) or `"flux"` (a [`~diffusers.FluxPipeline`] with CLIP and T5 text encoders
            and a flow-matching transformer, see [`make_demo_flux_pipeline`]).
        seed (`int`, *optional*, defaults to 0):
            Seed for the weights; the same seed gives identical weights. The global RNG state is left untouched.
        torch_dtype (`torch.dtype`, *optional*, defaults to `torch.float32`):
            The dtype to cast the pipeline to.
        device (`str` or `torch.device`, *optional*):
            The device to move the pipeline to; it stays on the CPU if not given.

    Returns:
        [`~diffusers.DiffusionPipeline`]: The pipeline.

    Example:
    ```py
    >>> from diffusers_uce.demo import make_demo_pipeline
    >>> pipe = diffusers_uce.attach(make_demo_pipeline("sdxl"))
    >>> pipe.apply_concept_edits(erase="Van Gogh", guide="art")
    ```
    """
    if family not in DEMO_FAMILIES:
        raise ValueError(f"Unknown demo family {family!r}; expected one of {', '.join(DEMO_FAMILIES)}.")
    if family == "sdxl":
        pipe = make_demo_sdxl_pipeline(seed=seed, torch_dtype=torch_dtype, device=device)
    elif family == "flux":
        pipe = make_demo_flux_pipeline(seed=seed, torch_dtype=torch_dtype, device=device)
    else:
        pipe = make_demo_sd_pipeline(family, seed=seed, torch_dtype=torch_dtype, device=device)
    mark_demo(pipe)  # reports and cards say its weights are random
    logger.debug("Built %s demo pipeline (seed=%d).", family, seed)
    return pipe

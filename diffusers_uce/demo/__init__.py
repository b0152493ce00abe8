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
from .cogvideox import make_demo_cogvideox_pipeline
from .flux import make_demo_flux_pipeline
from .flux2 import make_demo_flux2_klein_pipeline, make_demo_flux2_pipeline
from .hidream import make_demo_hidream_pipeline
from .pixart import make_demo_pixart_alpha_pipeline, make_demo_pixart_pipeline
from .qwenimage import make_demo_qwenimage_pipeline
from .sana import make_demo_sana_pipeline
from .sd3 import make_demo_sd3_pipeline
from .stable_diffusion import make_demo_sd_pipeline
from .stable_diffusion_xl import make_demo_sdxl_pipeline
from .tokenizers import make_clip_tokenizer, make_t5_tokenizer
from .wan import make_demo_wan_pipeline

logger = logging.get_logger(__name__)

DEMO_FAMILIES = ("sd1", "sd2", "sdxl", "flux", "sd3", "pixart", "pixart-alpha", "wan", "cogvideox", "sana", "hidream",
                 "qwenimage", "flux2", "flux2-klein")

__all__ = [
    "DEMO_FAMILIES", "make_clip_tokenizer", "make_demo_clip", "make_demo_flux_pipeline", "make_demo_pipeline",
    "make_demo_flux2_klein_pipeline", "make_demo_flux2_pipeline", "make_demo_qwenimage_pipeline",
    "make_demo_sd_pipeline", "make_demo_sdxl_pipeline", "make_t5_tokenizer",
    "make_demo_cogvideox_pipeline", "make_demo_pixart_alpha_pipeline", "make_demo_pixart_pipeline",
    "make_demo_sd3_pipeline", "make_demo_wan_pipeline", "make_demo_hidream_pipeline", "make_demo_sana_pipeline",
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
            and a flow-matching transformer, see [`make_demo_flux_pipeline`]), `"sd3"` (a
            [`~diffusers.StableDiffusion3Pipeline`] with two CLIP and one T5 text encoders, see
            [`make_demo_sd3_pipeline`]), `"pixart"` or `"pixart-alpha"` (a [`~diffusers.PixArtSigmaPipeline`] or
            [`~diffusers.PixArtAlphaPipeline`] with a T5 text encoder, 256x256 images by default, see
            [`make_demo_pixart_pipeline`]), `"wan"` (a [`~diffusers.WanPipeline`] for video with a UMT5 text
            encoder; pass small `num_frames`, `height` and `width` to it, see [`make_demo_wan_pipeline`]),
            `"cogvideox"` (a [`~diffusers.CogVideoXPipeline`] for video with a T5 text encoder, see
            [`make_demo_cogvideox_pipeline`]), `"sana"` (a [`~diffusers.SanaPipeline`] with a Gemma 2 text
            encoder, see [`make_demo_sana_pipeline`]), `"hidream"` (a [`~diffusers.HiDreamImagePipeline`] with
            two CLIP, a T5 and a Llama text encoder, see [`make_demo_hidream_pipeline`]), `"qwenimage"` (a
            [`~diffusers.QwenImagePipeline`] with a Qwen2.5-VL text encoder, see [`make_demo_qwenimage_pipeline`]),
            `"flux2"` (a [`~diffusers.Flux2Pipeline`] with a Mistral 3 text encoder, see [`make_demo_flux2_pipeline`])
            or `"flux2-klein"` (a [`~diffusers.Flux2KleinPipeline`] with a Qwen3 text encoder, see
            [`make_demo_flux2_klein_pipeline`]).
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
    builders = {
        "sdxl": make_demo_sdxl_pipeline, "flux": make_demo_flux_pipeline, "sd3": make_demo_sd3_pipeline,
        "pixart": make_demo_pixart_pipeline, "pixart-alpha": make_demo_pixart_alpha_pipeline,
        "wan": make_demo_wan_pipeline, "cogvideox": make_demo_cogvideox_pipeline,
        "sana": make_demo_sana_pipeline, "hidream": make_demo_hidream_pipeline,
        "qwenimage": make_demo_qwenimage_pipeline, "flux2": make_demo_flux2_pipeline,
        "flux2-klein": make_demo_flux2_klein_pipeline,
    }
    if family in builders:
        pipe = builders[family](seed=seed, torch_dtype=torch_dtype, device=device)
    else:
        pipe = make_demo_sd_pipeline(family, seed=seed, torch_dtype=torch_dtype, device=device)
    mark_demo(pipe)  # reports and cards say its weights are random
    logger.debug("Built %s demo pipeline (seed=%d).", family, seed)
    return pipe

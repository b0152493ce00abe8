# Copyright 2025 The diffusers-uce authors. Licensed under the MIT License.
"""Tiny, offline, seeded PixArt-Σ and PixArt-α pipelines (the `"pixart"` and `"pixart-alpha"` demo families)."""

from __future__ import annotations

import torch
from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtSigmaPipeline, PixArtTransformer2DModel
from transformers import T5EncoderModel

from .components import cast_models, tiny_t5_config, tiny_vae
from .tokenizers import make_t5_tokenizer


def _make_pixart(pipeline_class, vae_scaling_factor: float, seed: int, torch_dtype, device):
    tokenizer = make_t5_tokenizer()
    d_model = 64
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = T5EncoderModel(tiny_t5_config(tokenizer, d_model))
        transformer = PixArtTransformer2DModel(
            num_attention_heads=2,
            attention_head_dim=16,
            in_channels=4,
            out_channels=8,  # learned variance, as PixArt
            num_layers=2,
            cross_attention_dim=32,  # the transformer's width: attn2 reads caption_projection's output
            sample_size=32,  # PixArt's 256x256 resolution binning, latents 32x32 with the 8x VAE
            patch_size=2,
            caption_channels=d_model,
        )
        vae = tiny_vae(block_out_channels=(8, 8, 8, 8), scaling_factor=vae_scaling_factor)
    cast_models((text_encoder, transformer, vae), torch_dtype, device)
    scheduler = DPMSolverMultistepScheduler(
        beta_start=0.0001, beta_end=0.02, beta_schedule="linear", prediction_type="epsilon"
    )
    pipe = pipeline_class(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_demo_pixart_pipeline(
    *, seed: int = 0, torch_dtype: torch.dtype = torch.float32, device: str | torch.device | None = None
) -> PixArtSigmaPipeline:
    r"""
    Builds a tiny, randomly initialised [`~diffusers.PixArtSigmaPipeline`] (PixArt-Σ) without downloading anything.

    Components: a 2-layer [`~transformers.T5EncoderModel`] (width 64, gated-GELU like T5 v1.1) with the
    [`make_t5_tokenizer`] tokenizer (prompts padded to 300 tokens, PixArt-Σ's default), a
    [`~diffusers.PixArtTransformer2DModel`] with 2 blocks (2 heads of 16, so width 32; `caption_projection` maps T5's
    64 to 32, then every block's cross-attention `attn2.to_k` / `attn2.to_v` reads those 32), a 4-level
    [`~diffusers.AutoencoderKL`] (latents are an eighth of the image size, as PixArt's) and a
    [`~diffusers.DPMSolverMultistepScheduler`] configured as PixArt's.

    PixArt bins the requested size to its trained resolutions (`use_resolution_binning=True`): the default image is
    256x256 (latents 32x32). Pass `use_resolution_binning=False, height=64, width=64` for smaller images. The
    pipeline's default `clean_caption=True` needs `beautifulsoup4` and `ftfy`; without them it logs a warning and
    leaves the prompt as it is: pass `clean_caption=False` to silence it.

    Args:
        seed (`int`, *optional*, defaults to 0):
            Seed for the weights; the same seed gives identical weights. The global RNG state is left untouched.
        torch_dtype (`torch.dtype`, *optional*, defaults to `torch.float32`):
            The dtype to cast the pipeline to.
        device (`str` or `torch.device`, *optional*):
            The device to move the pipeline to; it stays on the CPU if not given.

    Returns:
        [`~diffusers.PixArtSigmaPipeline`]: The pipeline.
    """
    return _make_pixart(PixArtSigmaPipeline, 0.13025, seed, torch_dtype, device)


def make_demo_pixart_alpha_pipeline(
    *, seed: int = 0, torch_dtype: torch.dtype = torch.float32, device: str | torch.device | None = None
) -> PixArtAlphaPipeline:
    r"""
    Builds a tiny, randomly initialised [`~diffusers.PixArtAlphaPipeline`] (PixArt-α) without downloading anything.

    The same components as [`make_demo_pixart_pipeline`] (with the same seed, the same weights), in a
    [`~diffusers.PixArtAlphaPipeline`], which pads prompts to 120 tokens, and with Stable Diffusion's VAE scaling
    factor. Like the 256 and 512 PixArt-α checkpoints, the transformer takes no resolution or aspect-ratio
    micro-conditions. The default image is 256x256.

    Args:
        seed (`int`, *optional*, defaults to 0):
            Seed for the weights; the same seed gives identical weights. The global RNG state is left untouched.
        torch_dtype (`torch.dtype`, *optional*, defaults to `torch.float32`):
            The dtype to cast the pipeline to.
        device (`str` or `torch.device`, *optional*):
            The device to move the pipeline to; it stays on the CPU if not given.

    Returns:
        [`~diffusers.PixArtAlphaPipeline`]: The pipeline.
    """
    return _make_pixart(PixArtAlphaPipeline, 0.18215, seed, torch_dtype, device)

# Copyright 2025 The diffusers-uce authors. Licensed under the MIT License.
"""A tiny, offline, seeded Wan 2.1 text-to-video pipeline (the `"wan"` demo family)."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
from transformers import UMT5Config, UMT5EncoderModel

from .components import cast_models, tiny_t5_config
from .tokenizers import make_t5_tokenizer


def make_demo_wan_pipeline(
    *, seed: int = 0, torch_dtype: torch.dtype = torch.float32, device: str | torch.device | None = None
) -> WanPipeline:
    r"""
    Builds a tiny, randomly initialised [`~diffusers.WanPipeline`] (Wan 2.1 text-to-video) without downloading
    anything.

    Components: a 2-layer [`~transformers.UMT5EncoderModel`] (width 64, gated-GELU) with the [`make_t5_tokenizer`]
    tokenizer (prompts padded to 512 tokens by the pipeline's `__call__`, 226 by its `encode_prompt`), a
    [`~diffusers.WanTransformer3DModel`] with 2 blocks (2 heads of 16, so width 32; `condition_embedder.text_embedder`
    maps UMT5's 64 to 32, then every block's cross-attention `attn2.to_k` / `attn2.to_v` reads those 32), a tiny
    4-level [`~diffusers.AutoencoderKLWan`] with Wan's 16 latent channels and compression (8x in space, 4x in time)
    and a [`~diffusers.UniPCMultistepScheduler`] configured for flow matching as Wan 2.1's (`flow_shift=3.0`).

    `WanPipeline` hard-codes its default size (81 frames of 480x832): pass small ones, e.g.
    `num_frames=5, height=32, width=32` (latents of 2 frames of 4x4; `num_frames - 1` must be a multiple of 4 and the
    sides multiples of 16).

    Args:
        seed (`int`, *optional*, defaults to 0):
            Seed for the weights; the same seed gives identical weights. The global RNG state is left untouched.
        torch_dtype (`torch.dtype`, *optional*, defaults to `torch.float32`):
            The dtype to cast the pipeline to.
        device (`str` or `torch.device`, *optional*):
            The device to move the pipeline to; it stays on the CPU if not given.

    Returns:
        [`~diffusers.WanPipeline`]: The pipeline.
    """
    tokenizer = make_t5_tokenizer()
    d_model = 64
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = UMT5EncoderModel(tiny_t5_config(tokenizer, d_model, UMT5Config))
        transformer = WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=2,
            attention_head_dim=16,
            in_channels=16,
            out_channels=16,
            text_dim=d_model,
            freq_dim=256,
            ffn_dim=64,
            num_layers=2,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            eps=1e-6,
        )
        vae = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1)
    cast_models((text_encoder, transformer, vae), torch_dtype, device)
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    pipe = WanPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler, transformer=transformer
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe

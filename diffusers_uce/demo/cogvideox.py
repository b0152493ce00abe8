# Copyright 2025 The diffusers-uce authors. Licensed under the MIT License.
"""A tiny, offline, seeded CogVideoX text-to-video pipeline (the `"cogvideox"` demo family)."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKLCogVideoX, CogVideoXDPMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel
from transformers import T5EncoderModel

from .components import cast_models, tiny_t5_config
from .tokenizers import make_t5_tokenizer


def make_demo_cogvideox_pipeline(
    *, seed: int = 0, torch_dtype: torch.dtype = torch.float32, device: str | torch.device | None = None
) -> CogVideoXPipeline:
    r"""
    Builds a tiny, randomly initialised [`~diffusers.CogVideoXPipeline`] (CogVideoX-5b style) without downloading
    anything.

    Components: a 2-layer [`~transformers.T5EncoderModel`] (width 64, gated-GELU like T5 v1.1) with the
    [`make_t5_tokenizer`] tokenizer (prompts padded to 226 tokens, CogVideoX's default), a
    [`~diffusers.CogVideoXTransformer3DModel`] with 2 blocks (2 heads of 16, so width 32, 3D rotary position
    embeddings; `patch_embed.text_proj` maps T5's 64 to 32, and the projected text then joins the video tokens in
    every block's joint attention), a tiny 4-level [`~diffusers.AutoencoderKLCogVideoX`] with CogVideoX's 16 latent
    channels and compression (8x in space, 4x in time) and a [`~diffusers.CogVideoXDPMScheduler`] configured as
    CogVideoX-5b's.

    The default video is 9 frames of 32x32 (latents of 3 frames of 4x4): the pipeline takes its defaults from the
    transformer's `sample_frames`, `sample_height` and `sample_width`. As with CogVideoX's 49 frames (13 latent
    frames), `num_frames - 1` should be a multiple of 8: the VAE decodes an even number of latent frames to more
    frames than were asked for.

    Args:
        seed (`int`, *optional*, defaults to 0):
            Seed for the weights; the same seed gives identical weights. The global RNG state is left untouched.
        torch_dtype (`torch.dtype`, *optional*, defaults to `torch.float32`):
            The dtype to cast the pipeline to.
        device (`str` or `torch.device`, *optional*):
            The device to move the pipeline to; it stays on the CPU if not given.

    Returns:
        [`~diffusers.CogVideoXPipeline`]: The pipeline.
    """
    tokenizer = make_t5_tokenizer()
    d_model = 64
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = T5EncoderModel(tiny_t5_config(tokenizer, d_model))
        transformer = CogVideoXTransformer3DModel(
            num_attention_heads=2,
            attention_head_dim=16,
            in_channels=16,
            out_channels=16,
            time_embed_dim=32,
            text_embed_dim=d_model,
            num_layers=2,
            sample_width=4,  # latent sizes: 9 frames of 32x32 by default
            sample_height=4,
            sample_frames=9,
            patch_size=2,
            temporal_compression_ratio=4,
            max_text_seq_length=226,
            use_rotary_positional_embeddings=True,
        )
        vae = AutoencoderKLCogVideoX(
            block_out_channels=(8, 8, 8, 8),
            latent_channels=16,
            layers_per_block=1,
            norm_num_groups=4,
            temporal_compression_ratio=4,
            sample_height=32,
            sample_width=32,
            scaling_factor=0.7,
        )
    cast_models((text_encoder, transformer, vae), torch_dtype, device)
    scheduler = CogVideoXDPMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
        set_alpha_to_one=True,
        snr_shift_scale=1.0,
        timestep_spacing="trailing",
    )
    pipe = CogVideoXPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe

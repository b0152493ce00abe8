# Copyright 2025 The diffusers-uce authors. Licensed under the MIT License.
"""A tiny, offline, seeded FLUX pipeline (the `"flux"` demo family)."""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextModel, T5EncoderModel

from .components import cast_models, tiny_vae
from .tokenizers import EOS_TOKEN, clip_text_config, make_clip_tokenizer, make_t5_tokenizer, t5_encoder_config


def make_demo_flux_pipeline(
    *, seed: int = 0, torch_dtype: torch.dtype = torch.float32, device: str | torch.device | None = None
) -> FluxPipeline:
    r"""
    Builds a tiny, randomly initialised [`~diffusers.FluxPipeline`] without downloading anything.

    Components: a 2-layer [`~transformers.CLIPTextModel`] (width 48; its pooled output conditions the transformer), a
    2-layer [`~transformers.T5EncoderModel`] (width 64, gated-GELU like T5 v1.1) with the [`make_t5_tokenizer`]
    tokenizer (512 tokens), a [`~diffusers.FluxTransformer2DModel`] with 1 double-stream and 1 single-stream block
    (2 heads of 16, so width 32: `context_embedder` maps T5's 64 to 32, `time_text_embed.text_embedder.linear_1`
    CLIP's 48 to 32; guidance-distilled like FLUX.1-dev), a 2-level [`~diffusers.AutoencoderKL`] with FLUX's 16
    latent channels (latents are half the image size, then packed in 2x2 patches: image sizes should be multiples of
    4) and a [`~diffusers.FlowMatchEulerDiscreteScheduler`] with FLUX.1-dev's resolution-dependent shift.

    The default image is 32x32 for the pipeline returned (`default_sample_size` is set on it); `FluxPipeline`
    hard-codes it, so a reloaded copy defaults to 256x256: pass `height` and `width` to it.

    Args:
        seed (`int`, *optional*, defaults to 0):
            Seed for the weights; the same seed gives identical weights. The global RNG state is left untouched.
        torch_dtype (`torch.dtype`, *optional*, defaults to `torch.float32`):
            The dtype to cast the pipeline to.
        device (`str` or `torch.device`, *optional*):
            The device to move the pipeline to; it stays on the CPU if not given.

    Returns:
        [`~diffusers.FluxPipeline`]: The pipeline.
    """
    tokenizer, tokenizer_2 = make_clip_tokenizer(pad_token=EOS_TOKEN), make_t5_tokenizer()
    hidden_size, d_model = 48, 64
    t5_config = t5_encoder_config(tokenizer_2, d_model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(clip_text_config(tokenizer, hidden_size, "quick_gelu"))
        text_encoder_2 = T5EncoderModel(t5_config)
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=64,  # 16 latent channels packed in 2x2 patches
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=d_model,
            pooled_projection_dim=hidden_size,
            guidance_embeds=True,
            axes_dims_rope=[4, 4, 8],  # sums to attention_head_dim
        )
        vae = tiny_vae(16, use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159)
    cast_models((text_encoder, text_encoder_2, transformer, vae), torch_dtype, device)
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    pipe.default_sample_size = 16  # x vae_scale_factor 2 = 32x32 images by default
    pipe.set_progress_bar_config(disable=True)
    return pipe

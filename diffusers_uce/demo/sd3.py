# Copyright 2025 The diffusers-uce authors. Licensed under the MIT License.
"""A tiny, offline, seeded Stable Diffusion 3 / 3.5 pipeline (the `"sd3"` demo family)."""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from transformers import T5EncoderModel

from .components import cast_models, clip_with_projection, tiny_t5_config, tiny_vae
from .tokenizers import EOS_TOKEN, make_clip_tokenizer, make_t5_tokenizer


def make_demo_sd3_pipeline(
    *, seed: int = 0, torch_dtype: torch.dtype = torch.float32, device: str | torch.device | None = None
) -> StableDiffusion3Pipeline:
    r"""
    Builds a tiny, randomly initialised [`~diffusers.StableDiffusion3Pipeline`] without downloading anything.

    Components: two 2-layer [`~transformers.CLIPTextModelWithProjection`] (width 32, projection 16,
    `"<|endoftext|>"` padding, and width 48, projection 24, `"!"` padding, standing for CLIP-L and CLIP-G), a 2-layer
    [`~transformers.T5EncoderModel`] (width 96, gated-GELU like T5 v1.1) with the [`make_t5_tokenizer`] tokenizer, a
    [`~diffusers.SD3Transformer2DModel`] with 2 joint blocks (2 heads of 16, so width 32; RMS query/key norms, the
    first block with SD 3.5 Medium's extra image self-attention, the last one context-pre-only), a 2-level
    [`~diffusers.AutoencoderKL`] with SD3's 16 latent channels (latents are half the image size) and a
    [`~diffusers.FlowMatchEulerDiscreteScheduler`] with SD3's shift of 3.

    As in SD3, the prompt embeddings are the two CLIP penultimate hidden states joined along the features
    (32 + 48 = 80), zero-padded to T5's width 96 and joined along the sequence with T5's (77 + 256 tokens by
    default): `transformer.context_embedder` maps 96 to 32. The pooled embeddings are the two projections joined
    (16 + 24 = 40): `transformer.time_text_embed.text_embedder.linear_1` maps 40 to 32. The default image is
    32x32.

    Args:
        seed (`int`, *optional*, defaults to 0):
            Seed for the weights; the same seed gives identical weights. The global RNG state is left untouched.
        torch_dtype (`torch.dtype`, *optional*, defaults to `torch.float32`):
            The dtype to cast the pipeline to.
        device (`str` or `torch.device`, *optional*):
            The device to move the pipeline to; it stays on the CPU if not given.

    Returns:
        [`~diffusers.StableDiffusion3Pipeline`]: The pipeline.
    """
    tokenizer, tokenizer_2 = make_clip_tokenizer(pad_token=EOS_TOKEN), make_clip_tokenizer(pad_token="!")
    tokenizer_3 = make_t5_tokenizer()
    (hidden_size, projection_dim), (hidden_size_2, projection_dim_2), d_model = (32, 16), (48, 24), 96
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = clip_with_projection(tokenizer, hidden_size, "quick_gelu", projection_dim)
        text_encoder_2 = clip_with_projection(tokenizer_2, hidden_size_2, "gelu", projection_dim_2)
        text_encoder_3 = T5EncoderModel(tiny_t5_config(tokenizer_3, d_model))
        transformer = SD3Transformer2DModel(
            sample_size=16,  # latent size: 32x32 images by default
            patch_size=2,
            in_channels=16,
            num_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=d_model,
            caption_projection_dim=32,  # the transformer's width, as in SD3
            pooled_projection_dim=projection_dim + projection_dim_2,
            out_channels=16,
            pos_embed_max_size=32,  # latents up to 64x64
            dual_attention_layers=(0,),
            qk_norm="rms_norm",
        )
        vae = tiny_vae(16, use_quant_conv=False, use_post_quant_conv=False, scaling_factor=1.5305, shift_factor=0.0609)
    cast_models((text_encoder, text_encoder_2, text_encoder_3, transformer, vae), torch_dtype, device)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe

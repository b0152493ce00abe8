# Copyright 2025 The diffusers-uce authors. Licensed under the MIT License.
"""A tiny, offline, seeded Stable Diffusion XL pipeline (the `"sdxl"` demo family)."""

from __future__ import annotations

import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextModel

from .components import cast_models, clip_with_projection, tiny_vae
from .tokenizers import EOS_TOKEN, clip_text_config, make_clip_tokenizer


def make_demo_sdxl_pipeline(
    *, seed: int = 0, torch_dtype: torch.dtype = torch.float32, device: str | torch.device | None = None
) -> StableDiffusionXLPipeline:
    r"""
    Builds a tiny, randomly initialised [`~diffusers.StableDiffusionXLPipeline`] without downloading anything.

    Components: a 2-layer [`~transformers.CLIPTextModel`] (width 32, `"<|endoftext|>"` padding) and a 2-layer
    [`~transformers.CLIPTextModelWithProjection`] (width 48, projection 16, `"!"` padding), a 2-level
    [`~diffusers.UNet2DConditionModel`] with SDXL's `"text_time"` conditioning, cross-attention width 32 + 48 = 80 and
    8 `attn2` modules (2 transformer layers in the second level and the middle), a 2-level
    [`~diffusers.AutoencoderKL`] (latents are half the image size) and an [`~diffusers.EulerDiscreteScheduler`]
    configured as SDXL's. `force_zeros_for_empty_prompt=True`, no watermarker. The default image is 32x32.

    Args:
        seed (`int`, *optional*, defaults to 0):
            Seed for the weights; the same seed gives identical weights. The global RNG state is left untouched.
        torch_dtype (`torch.dtype`, *optional*, defaults to `torch.float32`):
            The dtype to cast the pipeline to.
        device (`str` or `torch.device`, *optional*):
            The device to move the pipeline to; it stays on the CPU if not given.

    Returns:
        [`~diffusers.StableDiffusionXLPipeline`]: The pipeline.
    """
    tokenizer, tokenizer_2 = make_clip_tokenizer(pad_token=EOS_TOKEN), make_clip_tokenizer(pad_token="!")
    hidden_size, hidden_size_2, projection_dim, time_dim = 32, 48, 16, 8
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(clip_text_config(tokenizer, hidden_size, "quick_gelu"))
        text_encoder_2 = clip_with_projection(tokenizer_2, hidden_size_2, "gelu", projection_dim)
        unet = UNet2DConditionModel(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2),
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            cross_attention_dim=hidden_size + hidden_size_2,
            addition_embed_type="text_time",
            addition_time_embed_dim=time_dim,
            projection_class_embeddings_input_dim=6 * time_dim + projection_dim,
            norm_num_groups=8,
        )
        vae = tiny_vae(scaling_factor=0.13025)
    cast_models((text_encoder, text_encoder_2, unet, vae), torch_dtype, device)
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type="epsilon",
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe

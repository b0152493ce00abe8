# Copyright 2025 The diffusers-uce authors. Licensed under the MIT License.
"""Tiny, offline, seeded Stable Diffusion 1.x and 2.x pipelines (the `"sd1"` and `"sd2"` demo families)."""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel

from .components import cast_models, tiny_vae
from .tokenizers import EOS_TOKEN, clip_text_config, make_clip_tokenizer


def make_demo_sd_pipeline(
    family: str = "sd1",
    *,
    seed: int = 0,
    torch_dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
) -> StableDiffusionPipeline:
    r"""
    Builds a tiny, randomly initialised [`~diffusers.StableDiffusionPipeline`] without downloading anything.

    Components: a 2-layer [`~transformers.CLIPTextModel`], a 2-level [`~diffusers.UNet2DConditionModel`] with 4
    cross-attention (`attn2`) modules, a 2-level [`~diffusers.AutoencoderKL`] (latents are half the image size) and a
    [`~diffusers.DDIMScheduler`] with Stable Diffusion's betas; no safety checker. The default image is 32x32.

    Args:
        family (`str`, *optional*, defaults to `"sd1"`):
            `"sd1"` (text width 32, `"<|endoftext|>"` padding, epsilon prediction) or `"sd2"` (text width 48, `"!"`
            padding, per-block attention heads with linear projections, v-prediction).
        seed (`int`, *optional*, defaults to 0):
            Seed for the weights; the same seed gives identical weights. The global RNG state is left untouched.
        torch_dtype (`torch.dtype`, *optional*, defaults to `torch.float32`):
            The dtype to cast the pipeline to.
        device (`str` or `torch.device`, *optional*):
            The device to move the pipeline to; it stays on the CPU if not given.

    Returns:
        [`~diffusers.StableDiffusionPipeline`]: The pipeline.
    """
    if family not in ("sd1", "sd2"):
        raise ValueError(f"Unknown Stable Diffusion demo family {family!r}; expected 'sd1' or 'sd2'.")
    sd2 = family == "sd2"
    tokenizer = make_clip_tokenizer(pad_token="!" if sd2 else EOS_TOKEN)
    hidden_size = 48 if sd2 else 32
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(clip_text_config(tokenizer, hidden_size, "gelu" if sd2 else "quick_gelu"))
        unet = UNet2DConditionModel(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=hidden_size,
            attention_head_dim=(2, 4) if sd2 else 8,
            use_linear_projection=sd2,
            norm_num_groups=8,
        )
        vae = tiny_vae()
    cast_models((text_encoder, unet, vae), torch_dtype, device)
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="v_prediction" if sd2 else "epsilon",
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe

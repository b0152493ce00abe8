# Copyright 2025 The diffusers-uce authors. Licensed under the MIT License.
"""Pieces every demo pipeline shares: the tiny VAE and how models are cast."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL


def tiny_vae(latent_channels: int = 4, **config) -> AutoencoderKL:
    """A 2-level [`~diffusers.AutoencoderKL`] for 32x32 images (latents are half the image size); `config` adds or
    overrides settings (scaling factor, quant convs). Draws its weights from the global RNG."""
    return AutoencoderKL(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=latent_channels,
        norm_num_groups=8,
        **config,
    )


def cast_models(models, torch_dtype: torch.dtype, device: str | torch.device | None) -> None:
    """Move and cast demo models in place, in eval mode (as `from_pretrained` returns them)."""
    for model in models:
        # Weights are drawn in float32, then only rounded; `nn.Module.to` because
        # diffusers' `ModelMixin.to(dtype=...)` warns about "modules kept in float32" even when there are none.
        torch.nn.Module.to(model, device=device, dtype=torch_dtype).eval()

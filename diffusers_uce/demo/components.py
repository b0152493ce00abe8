# Copyright 2025 The diffusers-uce authors. Licensed under the MIT License.
"""Pieces every demo pipeline shares: the tiny VAE, the tiny T5 configuration and how models are cast."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL
from transformers import CLIPTextModelWithProjection, T5Config

from .tokenizers import clip_text_config


def tiny_vae(latent_channels: int = 4, block_out_channels: tuple[int, ...] = (16, 32), **config) -> AutoencoderKL:
    """A small [`~diffusers.AutoencoderKL`], by default 2-level for 32x32 images (latents are half the image size;
    each further level in `block_out_channels` halves them again); `config` adds or overrides settings (scaling
    factor, quant convs). Draws its weights from the global RNG."""
    levels = len(block_out_channels)
    return AutoencoderKL(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=block_out_channels,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        latent_channels=latent_channels,
        norm_num_groups=8,
        **config,
    )


def tiny_t5_config(tokenizer, d_model: int = 64, config_class: type[T5Config] = T5Config) -> T5Config:
    """A 2-layer gated-GELU (T5 v1.1 / UMT5 style) encoder configuration of width `d_model` for `tokenizer` (a
    [`make_t5_tokenizer`] tokenizer); `config_class` may be another T5-like configuration class
    ([`~transformers.UMT5Config`])."""
    return config_class(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )


def clip_with_projection(tokenizer, hidden_size: int, hidden_act: str, projection_dim: int):
    """A 2-layer [`~transformers.CLIPTextModelWithProjection`] of width `hidden_size` whose pooled output is projected
    to `projection_dim`. Draws its weights from the global RNG."""
    config = clip_text_config(tokenizer, hidden_size, hidden_act)
    config.projection_dim = projection_dim
    return CLIPTextModelWithProjection(config)


def cast_models(models, torch_dtype: torch.dtype, device: str | torch.device | None) -> None:
    """Move and cast demo models in place, in eval mode (as `from_pretrained` returns them)."""
    for model in models:
        # Weights are drawn in float32, then only rounded; `nn.Module.to` because
        # diffusers' `ModelMixin.to(dtype=...)` warns about "modules kept in float32" even when there are none.
        torch.nn.Module.to(model, device=device, dtype=torch_dtype).eval()

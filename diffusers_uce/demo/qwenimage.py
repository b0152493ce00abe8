# Copyright 2025 The diffusers-uce authors. Licensed under the MIT License.
"""A tiny, offline, seeded Qwen-Image pipeline (the `"qwenimage"` demo family)."""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
)
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from .chat_tokenizers import make_qwen2_tokenizer
from .components import cast_models

# The prompt template `QwenImagePipeline` wraps every prompt in (its `prompt_template_encode`): the tokenizer learns
# its words as single tokens, as Qwen's does, so that the pipeline's `prompt_template_encode_start_idx` (34) drops
# exactly the system turn and `"<|im_start|>user\n"`.
QWENIMAGE_PROMPT_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)


def make_demo_qwenimage_pipeline(
    *, seed: int = 0, torch_dtype: torch.dtype = torch.float32, device: str | torch.device | None = None
) -> QwenImagePipeline:
    r"""
    Builds a tiny, randomly initialised [`~diffusers.QwenImagePipeline`] without downloading anything.

    Components: a [`~transformers.Qwen2_5_VLForConditionalGeneration`] with a 2-layer text model (width 32, 2 query
    heads and 1 key-value head, multimodal RoPE) and a 2-block vision tower that the pipeline never uses; a
    [`~transformers.Qwen2Tokenizer`] made in code whose special tokens and template words tokenise as Qwen's do (the
    pipeline drops the same 34 template tokens, and `"<|im_end|>\n<|im_start|>assistant\n"`, 5 tokens, follows the
    prompt); a [`~diffusers.QwenImageTransformer2DModel`] with 2 blocks (2 heads of 16; `txt_norm` and `txt_in` read
    the text model's 32-wide last hidden states); a 3-level [`~diffusers.AutoencoderKLQwenImage`] with 16 latent
    channels (latents are a quarter of the image size, then packed in 2x2 patches: image sizes should be multiples
    of 8) and a [`~diffusers.FlowMatchEulerDiscreteScheduler`] configured as Qwen-Image's.

    The default image is 32x32 for the pipeline returned (`default_sample_size` is set on it); `QwenImagePipeline`
    hard-codes it, so a reloaded copy defaults to 512x512: pass `height` and `width` to it.

    Args:
        seed (`int`, *optional*, defaults to 0):
            Seed for the weights; the same seed gives identical weights. The global RNG state is left untouched.
        torch_dtype (`torch.dtype`, *optional*, defaults to `torch.float32`):
            The dtype to cast the pipeline to.
        device (`str` or `torch.device`, *optional*):
            The device to move the pipeline to; it stays on the CPU if not given.

    Returns:
        [`~diffusers.QwenImagePipeline`]: The pipeline.
    """
    tokenizer = make_qwen2_tokenizer([QWENIMAGE_PROMPT_TEMPLATE.format("")])
    hidden_size = 32
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=hidden_size,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=2048,
            rms_norm_eps=1e-6,
            # Multimodal RoPE: the temporal, height and width sections sum to half the head size (16 / 2).
            rope_parameters=dict(rope_type="default", rope_theta=1000000.0, mrope_section=[2, 3, 3]),
            bos_token_id=ids("<|endoftext|>"),
            eos_token_id=tokenizer.eos_token_id,
        ),
        vision_config=dict(
            depth=2,
            hidden_size=16,
            intermediate_size=24,
            num_heads=2,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            out_hidden_size=hidden_size,
            fullatt_block_indexes=[1],
        ),
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = Qwen2_5_VLForConditionalGeneration(config)
        transformer = QwenImageTransformer2DModel(
            patch_size=2,
            in_channels=64,  # 16 latent channels packed in 2x2 patches
            out_channels=16,
            num_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=hidden_size,
            guidance_embeds=False,
            axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim
        )
        vae = AutoencoderKLQwenImage(
            base_dim=8,
            z_dim=16,
            dim_mult=[1, 2, 2],
            num_res_blocks=1,
            attn_scales=[],
            temperal_downsample=[False, True],
        )
    cast_models((text_encoder, transformer, vae), torch_dtype, device)
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256,
        base_shift=0.5,
        invert_sigmas=False,
        max_image_seq_len=8192,
        max_shift=0.9,
        num_train_timesteps=1000,
        shift=1.0,
        shift_terminal=0.02,
        stochastic_sampling=False,
        time_shift_type="exponential",
        use_beta_sigmas=False,
        use_dynamic_shifting=True,
        use_exponential_sigmas=False,
        use_karras_sigmas=False,
    )
    pipe = QwenImagePipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer
    )
    pipe.default_sample_size = 8  # x vae_scale_factor 4 = 32x32 images by default
    pipe.set_progress_bar_config(disable=True)
    return pipe

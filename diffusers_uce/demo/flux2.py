# Copyright 2025 The diffusers-uce authors. Licensed under the MIT License.
"""Tiny, offline, seeded FLUX.2 pipelines (the `"flux2"` and `"flux2-klein"` demo families)."""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKLFlux2,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinPipeline,
    Flux2Pipeline,
    Flux2Transformer2DModel,
)
from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE
from transformers import Mistral3Config, Mistral3ForConditionalGeneration, Qwen3Config, Qwen3ForCausalLM

from .chat_tokenizers import make_byte_level_tokenizer, make_qwen2_tokenizer
from .components import cast_models

# Mistral's special tokens in the order of their ids (Tekken's: "[IMG]" is 10, "<pad>" 11, "[SYSTEM_PROMPT]" 17).
MISTRAL_SPECIAL_TOKENS = (
    "<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]",
    "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]", "[IMG_END]", "[PREFIX]", "[MIDDLE]",
    "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[TOOL_CONTENT]",
)
# Mistral Small 3.1's conversation format: "<s>[SYSTEM_PROMPT]system[/SYSTEM_PROMPT][INST]user[/INST]", message
# contents given as strings or as lists of {"type": "text" | "image"} items (what `Flux2Pipeline` passes).
MISTRAL_CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}[SYSTEM_PROMPT]{%- elif message['role'] == 'user' -%}[INST]{%- endif -%}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'text' -%}{{- item['text'] -}}{%- elif item['type'] == 'image' -%}[IMG]{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- if message['role'] == 'system' -%}[/SYSTEM_PROMPT]{%- elif message['role'] == 'user' -%}[/INST]"
    "{%- else -%}{{- eos_token -}}{%- endif -%}"
    "{%- endfor -%}"
)
# Qwen3's conversation format, with its `enable_thinking=False` generation prompt (what `Flux2KleinPipeline` asks for).
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}"
    "{{- '<think>\\n\\n</think>\\n\\n' -}}{%- endif -%}"
    "{%- endif -%}"
)

_ARGS_DOC = r"""
    Args:
        seed (`int`, *optional*, defaults to 0):
            Seed for the weights; the same seed gives identical weights. The global RNG state is left untouched.
        torch_dtype (`torch.dtype`, *optional*, defaults to `torch.float32`):
            The dtype to cast the pipeline to.
        device (`str` or `torch.device`, *optional*):
            The device to move the pipeline to; it stays on the CPU if not given.
"""


def _text_model_config(hidden_size: int, num_hidden_layers: int, vocab_size: int, **config) -> dict:
    """A tiny decoder-only text model: 2 query heads of 8, 1 key-value head. No `pad_token_id`, as in the real
    configs: the padding token's embedding row is random like any other, not zero."""
    return dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=24,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=hidden_size // 2,
        max_position_embeddings=2048,
        **config,
    )


def _flux2_parts(joint_attention_dim: int, guidance_embeds: bool):
    """The transformer and VAE both FLUX.2 demos share (drawn from the global RNG) and the scheduler."""
    transformer = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=128,  # 32 latent channels packed in 2x2 patches
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=joint_attention_dim,
        timestep_guidance_channels=256,
        mlp_ratio=3.0,
        axes_dims_rope=(4, 4, 4, 4),  # sums to attention_head_dim
        rope_theta=2000,
        guidance_embeds=guidance_embeds,
    )
    vae = AutoencoderKLFlux2(
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        layers_per_block=1,
        latent_channels=32,
        norm_num_groups=8,
        sample_size=32,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
        time_shift_type="exponential",
    )
    return transformer, vae, scheduler


def make_demo_flux2_pipeline(
    *, seed: int = 0, torch_dtype: torch.dtype = torch.float32, device: str | torch.device | None = None
) -> Flux2Pipeline:
    r"""
    Builds a tiny, randomly initialised [`~diffusers.Flux2Pipeline`] (FLUX.2 [dev]) without downloading anything.

    Components: a [`~transformers.Mistral3ForConditionalGeneration`] whose text model has 31 layers of width 16, so
    that the hidden states of layers 10, 20 and 30 the pipeline stacks by default exist and are intermediate ones, as
    in Mistral Small 3.1 (its 2-layer Pixtral vision tower is never used); a byte-level BPE
    [`~transformers.PreTrainedTokenizerFast`] made in code that pads on the left like Mistral's and has Mistral's
    special tokens and chat format (`"<s>[SYSTEM_PROMPT]...[/SYSTEM_PROMPT][INST]prompt[/INST]"`, the system message's
    words single tokens) in place of the real model's `PixtralProcessor` (which needs torchvision): the pipeline's
    prompt encoding only calls `apply_chat_template`, which both provide (caption upsampling is not supported); a
    [`~diffusers.Flux2Transformer2DModel`] with 2 double-stream and 2 single-stream blocks (2 heads of 16;
    `context_embedder` maps the 3 x 16 = 48 stacked features to 32, without bias; guidance-distilled like [dev]); a
    2-level [`~diffusers.AutoencoderKLFlux2`] with 32 latent channels (latents are half the image size, then packed
    in 2x2 patches: image sizes should be multiples of 4) and a [`~diffusers.FlowMatchEulerDiscreteScheduler`].

    The default image is 32x32 for the pipeline returned (`default_sample_size` is set on it); `Flux2Pipeline`
    hard-codes it, so a reloaded copy defaults to 256x256: pass `height` and `width` to it. Prompts are padded to 512
    tokens, as in FLUX.2.
    """
    tokenizer = make_byte_level_tokenizer(
        [SYSTEM_MESSAGE],
        special_tokens=MISTRAL_SPECIAL_TOKENS,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side="left",
        chat_template=MISTRAL_CHAT_TEMPLATE,
    )
    hidden_size = 16
    config = Mistral3Config(
        text_config=dict(
            model_type="mistral",
            **_text_model_config(hidden_size, 31, len(tokenizer), rope_theta=1000000000.0, rms_norm_eps=1e-5),
            sliding_window=None,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        ),
        vision_config=dict(
            model_type="pixtral",
            hidden_size=16,
            intermediate_size=24,
            num_hidden_layers=2,
            num_attention_heads=2,
            head_dim=8,
            patch_size=14,
            image_size=56,
        ),
        image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"),
        spatial_merge_size=2,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = Mistral3ForConditionalGeneration(config)
        transformer, vae, scheduler = _flux2_parts(3 * hidden_size, guidance_embeds=True)
    cast_models((text_encoder, transformer, vae), torch_dtype, device)
    pipe = Flux2Pipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer
    )
    pipe.default_sample_size = 16  # x vae_scale_factor 2 = 32x32 images by default
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_demo_flux2_klein_pipeline(
    *, seed: int = 0, torch_dtype: torch.dtype = torch.float32, device: str | torch.device | None = None
) -> Flux2KleinPipeline:
    r"""
    Builds a tiny, randomly initialised [`~diffusers.Flux2KleinPipeline`] (FLUX.2 [klein] base) offline.

    Components: a [`~transformers.Qwen3ForCausalLM`] with 28 layers of width 16, so that the hidden states of layers
    9, 18 and 27 the pipeline stacks by default exist and are intermediate ones, as in Qwen3-4B; a
    [`~transformers.Qwen2Tokenizer`] made in code with Qwen3's special tokens and chat format (the prompt is wrapped in
    `"<|im_start|>user\n...<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"` and padded on the right with
    `"<|endoftext|>"` to 512 tokens); the same transformer (without guidance embedding: `context_embedder` maps
    3 x 16 = 48 to 32), VAE and scheduler as [`make_demo_flux2_pipeline`]. Like the undistilled [klein] base models
    (`is_distilled=False`), it runs classifier-free guidance against the empty prompt when `guidance_scale > 1`
    (the default, 4.0).

    The default image is 32x32 for the pipeline returned; a reloaded copy defaults to 256x256: pass `height` and
    `width` to it.
    """
    tokenizer = make_qwen2_tokenizer(
        ["<|im_start|>user\n<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"],
        special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        added_tokens=("<think>", "</think>"),
        chat_template=QWEN3_CHAT_TEMPLATE,
        model_max_length=40960,
    )
    hidden_size = 16
    config = Qwen3Config(
        **_text_model_config(hidden_size, 28, len(tokenizer), rope_theta=1000000.0, rms_norm_eps=1e-6),
        tie_word_embeddings=True,
        bos_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = Qwen3ForCausalLM(config)
        transformer, vae, scheduler = _flux2_parts(3 * hidden_size, guidance_embeds=False)
    cast_models((text_encoder, transformer, vae), torch_dtype, device)
    pipe = Flux2KleinPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        is_distilled=False,
    )
    pipe.default_sample_size = 16  # x vae_scale_factor 2 = 32x32 images by default
    pipe.set_progress_bar_config(disable=True)
    return pipe


make_demo_flux2_pipeline.__doc__ += _ARGS_DOC + "\n    Returns:\n        [`~diffusers.Flux2Pipeline`]: The pipeline.\n"
make_demo_flux2_klein_pipeline.__doc__ += (
    _ARGS_DOC + "\n    Returns:\n        [`~diffusers.Flux2KleinPipeline`]: The pipeline.\n"
)

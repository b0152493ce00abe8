# Copyright 2025 The diffusers-uce authors. Licensed under the MIT License.
"""A tiny, offline, seeded HiDream-I1 pipeline (the `"hidream"` demo family) and its Llama-3-style tokenizer."""

from __future__ import annotations

from functools import lru_cache

import torch
import transformers
from diffusers import FlowMatchEulerDiscreteScheduler, HiDreamImagePipeline, HiDreamImageTransformer2DModel
from transformers import CLIPTextModelWithProjection, LlamaConfig, LlamaForCausalLM, T5EncoderModel

from .components import cast_models, tiny_t5_config, tiny_vae
from .tokenizers import (
    EOS_TOKEN,
    WORDS,
    _bytes_to_unicode,
    _learn_merges,
    clip_text_config,
    make_clip_tokenizer,
    make_t5_tokenizer,
)

# Llama 3's special tokens come after its BPE vocabulary; its Instruct tokenizer ends a turn (and so "eos") with
# "<|eot_id|>". HiDream pads with the eos token.
LLAMA_BOS_TOKEN, LLAMA_EOS_TOKEN = "<|begin_of_text|>", "<|eot_id|>"
LLAMA_SPECIAL_TOKENS = (
    LLAMA_BOS_TOKEN, "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", LLAMA_EOS_TOKEN
)
# HiDream's Llama layer for each of its transformer blocks: the real model's 48 blocks read the 32 layers of Llama 3.1
# 8B in order, the last 16 blocks all read the last layer. Here 4 blocks over 3 layers, the last layer read twice.
LLAMA_LAYERS = (0, 1, 2, 2)


@lru_cache(maxsize=1)
def _llama_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    byte_encoder = _bytes_to_unicode()
    space = byte_encoder[ord(" ")]  # "Ġ": byte-level BPE keeps a word's leading space in its token
    words = {form for word in WORDS.lower().split() for form in (word, word.capitalize())}
    merges = _learn_merges(sorted({form for word in words for form in (word, space + word)}), end_of_word="")
    vocab: dict[str, int] = {}
    for token in [*byte_encoder.values(), *("".join(m) for m in merges), *LLAMA_SPECIAL_TOKENS]:
        vocab.setdefault(token, len(vocab))
    return vocab, merges


def make_llama_tokenizer() -> transformers.PreTrainedTokenizerFast:
    r"""
    Builds a small byte-level BPE tokenizer laid out like Llama 3's, offline.

    Like Llama 3.1 Instruct's (loaded as a [`~transformers.PreTrainedTokenizerFast`]): byte-level BPE (any text
    tokenises, down to single bytes; a word's leading space belongs to its token), case-sensitive,
    `"<|begin_of_text|>"` is prepended and nothing appended, the special tokens come after the BPE vocabulary and the
    eos token is `"<|eot_id|>"`. There is no padding token: [`~diffusers.HiDreamImagePipeline`] pads with the eos
    token. Every word of the built-in word list, lowercase and capitalised, with and without a leading space, is a
    single token.

    Returns:
        [`~transformers.PreTrainedTokenizerFast`]: The tokenizer.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE

    vocab, merges = _llama_vocab_and_merges()
    backend = Tokenizer(BPE(vocab=dict(vocab), merges=list(merges)))
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in LLAMA_SPECIAL_TOKENS])
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    bos = (LLAMA_BOS_TOKEN, vocab[LLAMA_BOS_TOKEN])
    backend.post_processor = processors.TemplateProcessing(
        single=f"{LLAMA_BOS_TOKEN} $A", pair=f"{LLAMA_BOS_TOKEN} $A {LLAMA_BOS_TOKEN} $B:1", special_tokens=[bos]
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=LLAMA_BOS_TOKEN, eos_token=LLAMA_EOS_TOKEN, model_max_length=131072
    )


def _long_clip(tokenizer: transformers.CLIPTokenizer, hidden_size: int, hidden_act: str):
    config = clip_text_config(tokenizer, hidden_size, hidden_act)
    config.max_position_embeddings = 248  # HiDream's CLIP encoders read 128 tokens (Long-CLIP positions)
    return CLIPTextModelWithProjection(config)


def make_demo_hidream_pipeline(
    *, seed: int = 0, torch_dtype: torch.dtype = torch.float32, device: str | torch.device | None = None
) -> HiDreamImagePipeline:
    r"""
    Builds a tiny, randomly initialised [`~diffusers.HiDreamImagePipeline`] without downloading anything.

    Components: two 2-layer [`~transformers.CLIPTextModelWithProjection`] (widths 32 and 48, padding with
    `"<|endoftext|>"` and `"!"`; their pooled outputs, 32 + 48 = 80 wide, feed `p_embedder`), a 2-layer
    [`~transformers.T5EncoderModel`] (width 64) with the [`make_t5_tokenizer`] tokenizer, a 3-layer
    [`~transformers.LlamaForCausalLM`] (width 48, grouped-query attention) with the [`make_llama_tokenizer`]
    tokenizer, a [`~diffusers.HiDreamImageTransformer2DModel`] with 2 double-stream and 2 single-stream blocks (2
    heads of 16, so width 32; mixture-of-experts feed-forwards with 4 routed experts, 2 active) whose
    `caption_projection` holds one bias-free linear layer per block reading Llama layer `llama_layers[i]` =
    (0, 1, 2, 2)[i] (48 wide) and a last one reading T5 (64 wide), FLUX's 16-channel
    [`~diffusers.AutoencoderKL`] (2 levels: latents are half the image size, packed in 2x2 patches) and a
    [`~diffusers.FlowMatchEulerDiscreteScheduler`] with shift 3.

    All text encoders read HiDream's default 128 tokens. The image area is fixed by `default_sample_size`, which is
    set to 16 on the pipeline returned (32x32 images); `HiDreamImagePipeline` hard-codes 128, so a reloaded copy makes
    256x256 images whatever `height` and `width` it is given: set `default_sample_size` on it.

    Args:
        seed (`int`, *optional*, defaults to 0):
            Seed for the weights; the same seed gives identical weights. The global RNG state is left untouched.
        torch_dtype (`torch.dtype`, *optional*, defaults to `torch.float32`):
            The dtype to cast the pipeline to.
        device (`str` or `torch.device`, *optional*):
            The device to move the pipeline to; it stays on the CPU if not given.

    Returns:
        [`~diffusers.HiDreamImagePipeline`]: The pipeline.
    """
    tokenizer = make_clip_tokenizer(pad_token=EOS_TOKEN, model_max_length=128)
    tokenizer_2 = make_clip_tokenizer(pad_token="!", model_max_length=128)
    tokenizer_3, tokenizer_4 = make_t5_tokenizer(), make_llama_tokenizer()
    llama_config = LlamaConfig(
        vocab_size=len(tokenizer_4),
        hidden_size=48,
        intermediate_size=168,
        num_hidden_layers=max(LLAMA_LAYERS) + 1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=12,
        rms_norm_eps=1e-5,
        max_position_embeddings=131072,
        tie_word_embeddings=False,
        bos_token_id=tokenizer_4.bos_token_id,
        eos_token_id=tokenizer_4.eos_token_id,
    )
    llama_config._attn_implementation = "eager"  # HiDream asks Llama for its attention maps
    t5_config = tiny_t5_config(tokenizer_3, 64)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = _long_clip(tokenizer, 32, "quick_gelu")
        text_encoder_2 = _long_clip(tokenizer_2, 48, "gelu")
        text_encoder_3 = T5EncoderModel(t5_config)
        text_encoder_4 = LlamaForCausalLM(llama_config)
        transformer = HiDreamImageTransformer2DModel(
            patch_size=2,
            in_channels=16,
            out_channels=16,
            num_layers=2,
            num_single_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            caption_channels=[t5_config.d_model, llama_config.hidden_size],
            text_emb_dim=text_encoder.config.projection_dim + text_encoder_2.config.projection_dim,
            num_routed_experts=4,
            num_activated_experts=2,
            axes_dims_rope=(8, 4, 4),  # sums to attention_head_dim
            max_resolution=(128, 128),
            llama_layers=list(LLAMA_LAYERS),
        )
        vae = tiny_vae(16, use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159)
    cast_models((text_encoder, text_encoder_2, text_encoder_3, text_encoder_4, transformer, vae), torch_dtype, device)
    pipe = HiDreamImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
        text_encoder_4=text_encoder_4,
        tokenizer_4=tokenizer_4,
        transformer=transformer,
    )
    pipe.default_sample_size = 16  # x vae_scale_factor 2 = 32x32 images
    pipe.set_progress_bar_config(disable=True)
    return pipe

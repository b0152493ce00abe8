# Copyright 2025 The diffusers-uce authors. Licensed under the MIT License.
"""A tiny, offline, seeded Sana pipeline (the `"sana"` demo family) and its Gemma-style tokenizer."""

from __future__ import annotations

import string
from functools import lru_cache

import torch
import transformers
from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, SanaPipeline, SanaTransformer2DModel
from transformers import Gemma2Config, Gemma2Model

from .components import cast_models
from .tokenizers import WORDS, _learn_merges

_SPACE = "\u2581"  # SentencePiece's "▁": Gemma writes every space as this symbol
GEMMA_SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>")  # ids 0-4, as in Gemma's vocabulary

# Words of the instruction Sana prepends to every prompt, so that it tokenises into whole words as with Gemma's real
# (256k) vocabulary instead of into single characters. Case-sensitive, like Gemma.
INSTRUCTION_WORDS = """
Given Evaluate If Here Please User Prompt Enhanced A user prompt generate enhanced that provides detailed visual
descriptions suitable for image generation evaluate level detail simple focus adding specifics about shapes sizes
textures spatial relationships create vivid concrete scenes already refine enhance existing details slightly without
overcomplicating examples how transform refine prompts sleeping fluffy curled up round shape peacefully warm sunny
windowsill surrounded pots blooming busy bustling scene dusk featuring glowing lamps diverse crowd clothing double
decker bus passing by towering glass skyscrapers only description below avoid including any additional commentary
evaluations
"""


@lru_cache(maxsize=1)
def _gemma_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    words = set(WORDS.lower().split()) | set(INSTRUCTION_WORDS.split())
    # Gemma adds no space before the first word: every word is learned with and without its leading "▁".
    merges = _learn_merges(sorted({form for word in words for form in (word, _SPACE + word)}), end_of_word="")
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]  # byte fallback for characters outside the vocabulary
    characters = [_SPACE, "\n", *(c for c in string.printable if not c.isspace())]
    vocab: dict[str, int] = {}
    for token in [*GEMMA_SPECIAL_TOKENS, *byte_tokens, *characters, *("".join(m) for m in merges)]:
        vocab.setdefault(token, len(vocab))
    return vocab, merges


def make_gemma_tokenizer() -> transformers.GemmaTokenizer:
    r"""
    Builds a small Gemma-style BPE [`~transformers.GemmaTokenizer`] offline.

    Like Gemma's: spaces become `"▁"` (no space is added before the first word), case-sensitive, byte fallback for
    anything outside the vocabulary (`"<0xE6>"`...), `"<bos>"` is prepended and nothing appended, `"<pad>"`,
    `"<eos>"`, `"<bos>"`, `"<unk>"` are ids 0, 1, 2, 3. Every word of the built-in word list (lowercase) and of the
    instruction Sana prepends is a single token, both as `"word"` and `"▁word"`.

    Returns:
        [`~transformers.GemmaTokenizer`]: The tokenizer.
    """
    vocab, merges = _gemma_vocab_and_merges()
    return transformers.GemmaTokenizer(vocab=dict(vocab), merges=list(merges), add_bos_token=True, add_eos_token=False)


def make_demo_sana_pipeline(
    *, seed: int = 0, torch_dtype: torch.dtype = torch.float32, device: str | torch.device | None = None
) -> SanaPipeline:
    r"""
    Builds a tiny, randomly initialised [`~diffusers.SanaPipeline`] without downloading anything.

    Components: a 2-layer [`~transformers.Gemma2Model`] (width 48, one sliding-window and one global attention layer,
    grouped-query attention with 4 query and 2 key/value heads of 16) with the [`make_gemma_tokenizer`] tokenizer, a
    [`~diffusers.SanaTransformer2DModel`] with 2 blocks (linear self-attention, cross-attention `attn2` of 2 heads of
    16, so width 32: `caption_projection` maps Gemma's 48 to 32, then `caption_norm`), `sample_size` 16 like Sana's
    512px models, a 6-level [`~diffusers.AutoencoderDC`] with Sana's 32x compression and 32 latent channels, and a
    flow-matching [`~diffusers.DPMSolverMultistepScheduler`] (`flow_shift` 3) like Sana's.

    Sana's own defaults apply: the prompt is prefixed with the pipeline's complex human instruction and 300 tokens are
    kept, and with resolution binning a call without `height`/`width` makes 512x512 images (16x16 latents).

    Args:
        seed (`int`, *optional*, defaults to 0):
            Seed for the weights; the same seed gives identical weights. The global RNG state is left untouched.
        torch_dtype (`torch.dtype`, *optional*, defaults to `torch.float32`):
            The dtype to cast the pipeline to.
        device (`str` or `torch.device`, *optional*):
            The device to move the pipeline to; it stays on the CPU if not given.

    Returns:
        [`~diffusers.SanaPipeline`]: The pipeline.
    """
    tokenizer = make_gemma_tokenizer()
    gemma_config = Gemma2Config(
        vocab_size=len(tokenizer),
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=16,
        hidden_activation="gelu_pytorch_tanh",
        max_position_embeddings=8192,
        sliding_window=4096,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    channels = (8, 8, 16, 16, 32, 32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = Gemma2Model(gemma_config)
        transformer = SanaTransformer2DModel(
            in_channels=32,
            out_channels=32,
            num_attention_heads=2,
            attention_head_dim=16,
            num_layers=2,
            num_cross_attention_heads=2,
            cross_attention_head_dim=16,
            cross_attention_dim=32,
            caption_channels=gemma_config.hidden_size,
            mlp_ratio=2.5,
            sample_size=16,
            patch_size=1,
        )
        vae = AutoencoderDC(
            latent_channels=32,
            attention_head_dim=8,
            encoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
            decoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
            encoder_block_out_channels=channels,
            decoder_block_out_channels=channels,
            encoder_layers_per_block=(1,) * 6,
            decoder_layers_per_block=(1,) * 6,
            encoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
            decoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
            upsample_block_type="interpolate",
            downsample_block_type="Conv",
            decoder_norm_types=("batch_norm",) * 3 + ("rms_norm",) * 3,
            decoder_act_fns=("relu",) * 3 + ("silu",) * 3,
            scaling_factor=0.41407,
        )
    cast_models((text_encoder, transformer, vae), torch_dtype, device)
    scheduler = DPMSolverMultistepScheduler(flow_shift=3.0, use_flow_sigmas=True, prediction_type="flow_prediction")
    pipe = SanaPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe

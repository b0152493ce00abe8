# Copyright 2025 The diffusers-uce authors. Licensed under the MIT License.
"""Byte-level BPE tokenizers with chat special tokens, made in code, for the demo pipelines whose text encoder is a
chat language model (Qwen2.5-VL, Qwen3, Mistral 3)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE
from transformers import PreTrainedTokenizerFast, Qwen2Tokenizer
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

from .tokenizers import WORDS, _bytes_to_unicode, _learn_merges

QWEN_ENDOFTEXT, QWEN_IM_START, QWEN_IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
# Qwen2.5-VL's special tokens in the order of their ids (151643 onwards in the real vocabulary).
QWEN_VL_SPECIAL_TOKENS = (
    QWEN_ENDOFTEXT, QWEN_IM_START, QWEN_IM_END, "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>",
)


def _split(pattern: str = PRETOKENIZE_REGEX) -> pre_tokenizers.Split:
    return pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False)


def _pieces(text: str, special_tokens: Sequence[str]) -> list[str]:
    """The byte-encoded pre-tokenizer chunks of `text` (special tokens removed), as a byte-level BPE sees them."""
    byte_encoder = _bytes_to_unicode()
    if special_tokens:
        text = "\n".join(re.split("|".join(map(re.escape, special_tokens)), text))
    return ["".join(byte_encoder[b] for b in chunk.encode("utf-8")) for chunk, _ in _split().pre_tokenize_str(text)]


@lru_cache(maxsize=8)
def _learn(texts: tuple[str, ...], special_tokens: tuple[str, ...], specials_first: bool):
    words = " ".join(WORDS.split())
    # Every listed word, lower-case and capitalised, with and without a leading space (first word of a message or
    # not), and every chunk of the given texts (chat templates, system messages) becomes one token.
    capitalized = " ".join(word.capitalize() for word in WORDS.split())
    corpus = "\n".join([words + " " + capitalized, *texts, *(words + " " + capitalized).split()]) + "\n\n"
    pieces = sorted(set(_pieces(corpus, special_tokens)) - {""})
    merges = _learn_merges(pieces, end_of_word="")
    symbols = list(_bytes_to_unicode().values()) + ["".join(m) for m in merges]
    vocab: dict[str, int] = {}
    for token in [*special_tokens, *symbols] if specials_first else [*symbols, *special_tokens]:
        vocab.setdefault(token, len(vocab))
    return vocab, merges


def byte_level_vocab_and_merges(
    texts: Sequence[str] = (), special_tokens: Sequence[str] = (), *, specials_first: bool = False
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    r"""
    Learns a small byte-level BPE (GPT-2 / Qwen2 style, no end-of-word marker) deterministically and offline.

    Every word of the built-in word list (lower-case and capitalised, with and without a leading space) and every
    pre-tokenizer chunk of `texts` becomes a single token; any other text falls back to smaller pieces down to single
    bytes, so everything tokenises.

    Args:
        texts (`Sequence[str]`, *optional*):
            Extra text whose chunks must be single tokens, such as a chat template or a system message.
        special_tokens (`Sequence[str]`, *optional*):
            Tokens added to the vocabulary as they are, in this order.
        specials_first (`bool`, *optional*, defaults to `False`):
            Give the special tokens the first ids (Mistral's layout) instead of the last ones (Qwen's).

    Returns:
        `tuple[dict[str, int], list[tuple[str, str]]]`: The vocabulary and the merges, in rank order.
    """
    vocab, merges = _learn(tuple(texts), tuple(special_tokens), specials_first)
    return dict(vocab), list(merges)


def make_qwen2_tokenizer(
    texts: Sequence[str] = (),
    *,
    special_tokens: Sequence[str] = QWEN_VL_SPECIAL_TOKENS,
    added_tokens: Sequence[str] = (),
    eos_token: str = QWEN_IM_END,
    chat_template: str | None = None,
    model_max_length: int = 32768,
) -> Qwen2Tokenizer:
    r"""
    Builds a small [`~transformers.Qwen2Tokenizer`] offline (see [`byte_level_vocab_and_merges`]).

    Like Qwen's, it pads with `"<|endoftext|>"` on the right, adds no BOS or EOS token, and treats `"<|im_start|>"` and
    `"<|im_end|>"` as single special tokens, so that chat-template text tokenises into the same structure as with the
    real tokenizer (the template's words are single tokens here too).

    Args:
        texts (`Sequence[str]`, *optional*):
            Extra text whose chunks must be single tokens (the pipeline's prompt template).
        special_tokens (`Sequence[str]`, *optional*):
            The special tokens, `"<|endoftext|>"` first; Qwen2.5-VL's by default.
        added_tokens (`Sequence[str]`, *optional*):
            Tokens kept whole that are not special (Qwen3's `"<think>"` and `"</think>"`).
        eos_token (`str`, *optional*, defaults to `"<|im_end|>"`):
            The end-of-turn token.
        chat_template (`str`, *optional*):
            A Jinja chat template for `apply_chat_template`.
        model_max_length (`int`, *optional*, defaults to 32768):
            The maximum sequence length.

    Returns:
        [`~transformers.Qwen2Tokenizer`]: The tokenizer.
    """
    vocab, merges = byte_level_vocab_and_merges(texts, (*special_tokens, *added_tokens))
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        eos_token=eos_token,
        pad_token=QWEN_ENDOFTEXT,
        extra_special_tokens=[t for t in special_tokens if t not in (QWEN_ENDOFTEXT, eos_token)],
        model_max_length=model_max_length,
        padding_side="right",
    )
    if added_tokens:
        tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in added_tokens])
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


def make_byte_level_tokenizer(
    texts: Sequence[str] = (),
    *,
    special_tokens: Sequence[str],
    bos_token: str | None = None,
    eos_token: str | None = None,
    unk_token: str | None = None,
    pad_token: str | None = None,
    padding_side: str = "right",
    chat_template: str | None = None,
    model_max_length: int = 131072,
) -> PreTrainedTokenizerFast:
    r"""
    Builds a small byte-level BPE [`~transformers.PreTrainedTokenizerFast`] whose special tokens take the first ids
    (the layout of Mistral's Tekken tokenizers), offline (see [`byte_level_vocab_and_merges`]).

    Args:
        texts (`Sequence[str]`, *optional*):
            Extra text whose chunks must be single tokens (a system message).
        special_tokens (`Sequence[str]`):
            The special tokens, in the order of their ids.
        bos_token, eos_token, unk_token, pad_token (`str`, *optional*):
            Which special tokens play these roles.
        padding_side (`str`, *optional*, defaults to `"right"`):
            Where padding goes.
        chat_template (`str`, *optional*):
            A Jinja chat template for `apply_chat_template`.
        model_max_length (`int`, *optional*, defaults to 131072):
            The maximum sequence length.

    Returns:
        [`~transformers.PreTrainedTokenizerFast`]: The tokenizer.
    """
    vocab, merges = byte_level_vocab_and_merges(texts, special_tokens, specials_first=True)
    backend = Tokenizer(BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([_split(), pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                                        use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special_tokens])
    roles = dict(bos_token=bos_token, eos_token=eos_token, unk_token=unk_token, pad_token=pad_token)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        **{k: v for k, v in roles.items() if v is not None},
        extra_special_tokens=[t for t in special_tokens if t not in roles.values()],
        padding_side=padding_side,
        model_max_length=model_max_length,
    )
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer

# Copyright 2025 The diffusers-uce authors. Licensed under the MIT License.
"""Tokenizers made in code for the demo pipelines: a byte-level BPE CLIP tokenizer and a Unigram T5 tokenizer, both
learned from one built-in word list, offline and deterministic."""

from __future__ import annotations

import heapq
import json
import os
import string
import tempfile
from collections import defaultdict
from functools import lru_cache

import transformers
from transformers import CLIPTextConfig, CLIPTokenizer

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"

# Words the demo tokenizer learns as whole tokens: common English, art and style vocabulary, artists, professions,
# the Imagenette classes and a few moderation concepts. Anything else still tokenises, into smaller pieces.
WORDS = """
a an the of in on at by with and or for to from as is are was be it this that these those some no not very
one two three four five many new old big small little large tall short young beautiful ugly happy sad dark
light bright black white red green blue yellow orange purple pink brown gray gold silver color colors colorful
man woman men women person people child children boy girl baby face hands eyes hair smile portrait selfie
photo photograph photography picture image painting paint painted drawing sketch illustration artwork art
artist artistic style styled render rendering digital oil canvas watercolor acrylic poster cartoon anime
abstract realistic surreal detailed masterpiece trending artstation cinematic lighting studio background
landscape cityscape city street house building room sky clouds sun moon stars night day sunset sunrise
tree trees forest flower flowers garden river lake sea ocean beach mountain mountains field snow rain fire
water stone road bridge castle tower village window door table chair book
van gogh vincent starry picasso pablo cubism monet claude impressionism rembrandt salvador dali frida kahlo
leonardo vinci mona lisa andy warhol kelly mckernan thomas kinkade kilian eng tyler edlin ajin demi human
greg rutkowski alphonse mucha hokusai wave klimt
doctor nurse teacher ceo engineer lawyer scientist firefighter police officer chef pilot farmer soldier
janitor cleaner secretary librarian programmer designer manager worker student professor
dog dogs cat cats car cars truck church parachute tench fish golf ball chainsaw garbage french horn english
springer spaniel cassette player gas pump bird horse cow elephant lion tiger bear airplane boat train bicycle
nudity nude naked violence violent blood gore weapon gun knife male female gender race asian african
european latino safe unsafe erase erased concept
"""


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte-to-printable-unicode table; its order defines the first 256 vocabulary ids."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


def _learn_merges(words: list[str], end_of_word: str = "</w>") -> list[tuple[str, str]]:
    """Learns BPE merges (most frequent pair first, ties broken lexicographically) until every word is one token.
    `end_of_word` marks each word's last symbol (CLIP's `"</w>"`); tokenizers that mark spaces instead pass `""`.

    `end_of_word` marks each word's last symbol (CLIP's `"</w>"`); GPT-2-style byte-level BPEs pass `""`.

    A small deterministic learner: `tokenizers`' `BpeTrainer` breaks ties in hash-map order, so its merges (and
    therefore the token ids and the seeded embedding rows) differ between processes.
    """
    corpus = [list(word[:-1]) + [word[-1] + end_of_word] for word in words]
    counts: dict[tuple[str, str], int] = defaultdict(int)
    where: dict[tuple[str, str], set[int]] = defaultdict(set)
    for i, symbols in enumerate(corpus):
        for pair in zip(symbols, symbols[1:]):
            counts[pair] += 1
            where[pair].add(i)
    heap = [(-count, pair) for pair, count in counts.items()]
    heapq.heapify(heap)
    merges = []
    while heap:
        neg_count, pair = heapq.heappop(heap)
        if counts.get(pair, 0) != -neg_count or neg_count == 0:
            continue  # stale heap entry
        merges.append(pair)
        changed = set()
        for i in sorted(where.pop(pair)):
            old, new, j = corpus[i], [], 0
            while j < len(old):
                if j + 1 < len(old) and (old[j], old[j + 1]) == pair:
                    new.append(old[j] + old[j + 1])
                    j += 2
                else:
                    new.append(old[j])
                    j += 1
            for p in zip(old, old[1:]):
                counts[p] -= 1
                changed.add(p)
            for p in zip(new, new[1:]):
                counts[p] += 1
                where[p].add(i)
                changed.add(p)
            corpus[i] = new
        for p in sorted(changed):
            if counts[p] > 0:
                heapq.heappush(heap, (-counts[p], p))
            else:
                counts.pop(p, None)
    return merges


@lru_cache(maxsize=1)
def _vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    byte_encoder = _bytes_to_unicode()
    words = sorted({"".join(byte_encoder[b] for b in word.encode("utf-8")) for word in WORDS.lower().split()})
    merges = _learn_merges(words)
    # CLIP's layout: 256 byte symbols, the same with "</w>", the merge results, then the special tokens.
    base = list(byte_encoder.values())
    vocab: dict[str, int] = {}
    for token in base + [b + "</w>" for b in base] + ["".join(m) for m in merges] + [BOS_TOKEN, EOS_TOKEN]:
        vocab.setdefault(token, len(vocab))
    return vocab, merges


def make_clip_tokenizer(
    save_directory: str | os.PathLike | None = None,
    *,
    pad_token: str = EOS_TOKEN,
    model_max_length: int = 77,
) -> transformers.CLIPTokenizer:
    r"""
    Builds a small byte-level BPE [`~transformers.CLIPTokenizer`] entirely offline.

    The BPE is learned deterministically from a built-in list of a few hundred words (every listed word is a single
    token); unknown words fall back to smaller pieces down to single bytes, so any text tokenises.

    Args:
        save_directory (`str` or `os.PathLike`, *optional*):
            Where to write `vocab.json` and `merges.txt`. A temporary directory is used (and removed) if not given.
        pad_token (`str`, *optional*, defaults to `"<|endoftext|>"`):
            The padding token. Stable Diffusion 1.x pads with `"<|endoftext|>"`, 2.x with `"!"`.
        model_max_length (`int`, *optional*, defaults to 77):
            The maximum sequence length, BOS and EOS included.

    Returns:
        [`~transformers.CLIPTokenizer`]: The tokenizer.
    """
    vocab, merges = _vocab_and_merges()
    with tempfile.TemporaryDirectory() as tmp_dir:
        directory = os.fspath(save_directory) if save_directory is not None else tmp_dir
        os.makedirs(directory, exist_ok=True)
        vocab_file = os.path.join(directory, "vocab.json")
        merges_file = os.path.join(directory, "merges.txt")
        with open(vocab_file, "w", encoding="utf-8") as f:
            json.dump(vocab, f, ensure_ascii=False)
        with open(merges_file, "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
        # transformers 4.x takes (vocab_file, merges_file); 5.x takes (vocab, merges), where file paths are handed
        # to `tokenizers.models.BPE`, which reads them (and skips the "#version" header) at construction.
        tokenizer = CLIPTokenizer(vocab_file, merges_file, pad_token=pad_token, model_max_length=model_max_length)
    return tokenizer


def clip_text_config(tokenizer: CLIPTokenizer, hidden_size: int, hidden_act: str) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        hidden_act=hidden_act,
        layer_norm_eps=1e-5,
        projection_dim=hidden_size,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


T5_PAD_TOKEN, T5_EOS_TOKEN, T5_UNK_TOKEN = "<pad>", "</s>", "<unk>"
_SPACE = "\u2581"  # SentencePiece's "▁", which marks the start of a word


@lru_cache(maxsize=1)
def _t5_vocab() -> tuple[tuple[str, float], ...]:
    words = sorted(set(WORDS.lower().split()))
    capitalized = [word.capitalize() for word in words if word.capitalize() != word]
    # T5's layout: <pad> = 0, </s> = 1, <unk> = 2, then the pieces. Whole words (T5 is case-sensitive, so also their
    # capitalised forms) score far above the "▁" + single-character pieces any other ASCII word falls back to.
    return (
        (T5_PAD_TOKEN, 0.0),
        (T5_EOS_TOKEN, 0.0),
        (T5_UNK_TOKEN, 0.0),
        *((_SPACE + word, -5.0) for word in words),
        *((_SPACE + word, -6.0) for word in capitalized),
        (_SPACE, -8.0),
        *((char, -10.0) for char in string.printable[:94]),  # digits, letters and punctuation
    )


def make_t5_tokenizer(
    save_directory: str | os.PathLike | None = None,
    *,
    model_max_length: int = 512,
) -> transformers.T5TokenizerFast:
    r"""
    Builds a small SentencePiece-style (Unigram) [`~transformers.T5TokenizerFast`] offline.

    The vocabulary holds every word of the built-in word list, lowercase and capitalised, as a single `"▁word"` piece;
    other ASCII text falls back to `"▁"` and single characters, anything else to `"<unk>"`. Like T5's, it is
    case-sensitive, appends `"</s>"` and pads with `"<pad>"` (`"<pad>"`, `"</s>"`, `"<unk>"` are ids 0, 1, 2), and
    `""` tokenises to `["</s>"]` alone.

    Args:
        save_directory (`str` or `os.PathLike`, *optional*):
            Where to also save it with `save_pretrained` (created if needed).
        model_max_length (`int`, *optional*, defaults to 512):
            The maximum sequence length, `"</s>"` included (FLUX pads the prompt to 512 tokens by default).

    Returns:
        [`~transformers.T5TokenizerFast`]: The tokenizer.
    """
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import Unigram

    # The same pipeline as transformers 5's `T5Tokenizer` builds from a vocabulary: transformers 5 rebuilds it that
    # way (from the saved vocabulary and post-processor only) when loading, so anything else would not survive a
    # `save_pretrained` / `from_pretrained` round trip (a `Lowercase` normalizer, for one, is dropped).
    backend = Tokenizer(Unigram(list(_t5_vocab()), unk_id=2, byte_fallback=False))
    metaspace = dict(replacement=_SPACE, prepend_scheme="always", split=True)
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(**metaspace)]
    )
    backend.decoder = decoders.Metaspace(**metaspace)
    backend.post_processor = processors.TemplateProcessing(
        single=["$A", T5_EOS_TOKEN], pair=["$A", T5_EOS_TOKEN, "$B", T5_EOS_TOKEN], special_tokens=[(T5_EOS_TOKEN, 1)]
    )
    tokenizer = transformers.T5TokenizerFast(
        tokenizer_object=backend,
        eos_token=T5_EOS_TOKEN,
        unk_token=T5_UNK_TOKEN,
        pad_token=T5_PAD_TOKEN,
        extra_ids=0,
        model_max_length=model_max_length,
    )
    if save_directory is not None:
        tokenizer.save_pretrained(save_directory)
    return tokenizer

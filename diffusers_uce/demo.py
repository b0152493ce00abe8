# Copyright 2025 The diffusers-uce authors. Licensed under the MIT License.
"""Tiny, offline, seeded Stable Diffusion (1.x, 2.x, XL) and FLUX pipelines for tests, docs and demos.

Everything is built in code: a byte-level BPE CLIP tokenizer learned from a built-in word list, and randomly
initialised (but seeded) CLIP text encoder, UNet and VAE. Nothing is downloaded. The SDXL and FLUX builders (and the
T5 tokenizer FLUX needs) live in [`diffusers_uce.demo_families`].
"""

from __future__ import annotations

import heapq
import json
import os
import tempfile
from collections import defaultdict
from functools import lru_cache

import torch
import transformers
from diffusers import AutoencoderKL, DDIMScheduler, DiffusionPipeline, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.utils import logging
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer


logger = logging.get_logger(__name__)

DEMO_FAMILIES = ("sd1", "sd2", "sdxl", "flux")

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"

# Words the demo tokenizer learns as whole tokens: common English, art and style vocabulary, artists, professions,
# the Imagenette classes and a few moderation concepts. Anything else still tokenises, into smaller pieces.
_WORDS = """
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


def _learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """Learns BPE merges (most frequent pair first, ties broken lexicographically) until every word is one token.

    A small deterministic learner: `tokenizers`' `BpeTrainer` breaks ties in hash-map order, so its merges (and
    therefore the token ids and the seeded embedding rows) differ between processes.
    """
    corpus = [list(word[:-1]) + [word[-1] + "</w>"] for word in words]
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
    words = sorted({"".join(byte_encoder[b] for b in word.encode("utf-8")) for word in _WORDS.lower().split()})
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


def _text_encoder_config(tokenizer: CLIPTokenizer, hidden_size: int, hidden_act: str) -> CLIPTextConfig:
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


def make_demo_pipeline(
    family: str = "sd1",
    *,
    seed: int = 0,
    torch_dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
) -> DiffusionPipeline:
    r"""
    Builds a tiny, randomly initialised pipeline of one of the [`DEMO_FAMILIES`] without downloading anything.

    For `"sd1"` and `"sd2"`, a [`~diffusers.StableDiffusionPipeline`]: a 2-layer [`~transformers.CLIPTextModel`], a
    2-level [`~diffusers.UNet2DConditionModel`] with 4 cross-attention (`attn2`) modules, a 2-level
    [`~diffusers.AutoencoderKL`] (latents are half the image size) and a [`~diffusers.DDIMScheduler`] with Stable
    Diffusion's betas; no safety checker. `"sdxl"` and `"flux"` are built by
    [`~diffusers_uce.demo_families.make_demo_sdxl_pipeline`] and
    [`~diffusers_uce.demo_families.make_demo_flux_pipeline`]. The default image is 32x32.

    Args:
        family (`str`, *optional*, defaults to `"sd1"`):
            `"sd1"` (text width 32, `"<|endoftext|>"` padding, epsilon prediction), `"sd2"` (text width 48,
            `"!"` padding, per-block attention heads with linear projections, v-prediction), `"sdxl"` (a
            [`~diffusers.StableDiffusionXLPipeline`]: two CLIP text encoders of widths 32 and 48) or `"flux"` (a
            [`~diffusers.FluxPipeline`]: CLIP and T5 text encoders, a flow-matching transformer).
        seed (`int`, *optional*, defaults to 0):
            Seed for the weights; the same seed gives identical weights. The global RNG state is left untouched.
        torch_dtype (`torch.dtype`, *optional*, defaults to `torch.float32`):
            The dtype to cast the pipeline to.
        device (`str` or `torch.device`, *optional*):
            The device to move the pipeline to; it stays on the CPU if not given.

    Returns:
        [`~diffusers.DiffusionPipeline`]: The pipeline: a [`~diffusers.StableDiffusionPipeline`] (`"sd1"`, `"sd2"`),
        [`~diffusers.StableDiffusionXLPipeline`] (`"sdxl"`) or [`~diffusers.FluxPipeline`] (`"flux"`).
    """
    if family not in DEMO_FAMILIES:
        raise ValueError(f"Unknown demo family {family!r}; expected one of {', '.join(DEMO_FAMILIES)}.")
    if family in ("sdxl", "flux"):
        from . import demo_families

        build = demo_families.make_demo_sdxl_pipeline if family == "sdxl" else demo_families.make_demo_flux_pipeline
        pipe = build(seed=seed, torch_dtype=torch_dtype, device=device)
        logger.debug("Built %s demo pipeline (seed=%d).", family, seed)
        return pipe
    sd2 = family == "sd2"
    tokenizer = make_clip_tokenizer(pad_token="!" if sd2 else EOS_TOKEN)
    hidden_size = 48 if sd2 else 32
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(_text_encoder_config(tokenizer, hidden_size, "gelu" if sd2 else "quick_gelu"))
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
        vae = AutoencoderKL(
            sample_size=32,
            in_channels=3,
            out_channels=3,
            block_out_channels=(16, 32),
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            latent_channels=4,
            norm_num_groups=8,
        )
    for model in (text_encoder, unet, vae):
        # Weights are drawn in float32 whatever `torch_dtype`, so dtypes only differ by rounding. `nn.Module.to`
        # because diffusers' `ModelMixin.to(dtype=...)` warns about "modules kept in float32" even when there are none.
        torch.nn.Module.to(model, device=device, dtype=torch_dtype)
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
    logger.debug("Built %s demo pipeline (seed=%d, vocab=%d).", family, seed, len(tokenizer))
    return pipe


def make_demo_clip(save_directory: str | os.PathLike, *, seed: int = 0, image_size: int = 32) -> str:
    r"""Save a tiny, random, offline CLIP model and processor, as a local CLIP checkpoint would be laid out.

    For trying and testing what needs a CLIP model (the debias loop's zero-shot classifier, CLIP metrics of the
    evaluation) without downloading one: the numbers it gives mean nothing.

    Args:
        save_directory (`str` or `os.PathLike`): where to save it (created if needed).
        seed (`int`, defaults to 0): seed of the random weights.
        image_size (`int`, defaults to 32): the vision tower's input size.

    Returns:
        `str`: the folder, to pass wherever a CLIP model id or path is taken.
    """
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tokenizer = make_clip_tokenizer()
    text = dict(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  image_size=image_size, patch_size=image_size // 4)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8))
    path = os.fspath(save_directory)
    model.save_pretrained(path)
    image_processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                         crop_size={"height": image_size, "width": image_size})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    return path

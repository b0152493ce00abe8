# Copyright 2025 The diffusers-uce authors. Licensed under the MIT License.
"""A tiny, random, offline CLIP model for what needs one (debias classifier, CLIP metrics) in tests and demos."""

from __future__ import annotations

import os

import torch

from .tokenizers import make_clip_tokenizer


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

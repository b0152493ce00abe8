"""Prompt encoding and token selection (DESIGN.md §2).

Every distinct prompt of an edit is tokenised once (padded to the tokenizer's ``model_max_length``) and encoded in
batches, one pass of the pipeline's own text encoder. ``k(x)`` is the index of the last real token of prompt ``x``
(attention-mask ones − 2; ``k("") = 0``, the start token). The CLIP tower is causal, so when only positions up to
``max k`` are needed ("last" mode) the ids are cut there: the states are the same and most of the cost goes away.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.utils import logging
from tqdm.auto import tqdm

logger = logging.get_logger(__name__)


@dataclass
class EncodedPrompts:
    """Hidden states of distinct prompts.

    Args:
        index (`dict[str, int]`): row of each prompt in `states`.
        states (`torch.Tensor`): hidden states, ``(num_prompts, seq_len, d)``; `seq_len` may be cut below the
            tokenizer's maximum when the encoder is causal and no later position is needed.
        last (`torch.Tensor`): ``k`` of each prompt, ``(num_prompts,)``, long, on the states' device.
        max_length (`int`): the tokenizer's padded length (77 for CLIP).
    """

    index: dict[str, int]
    states: torch.Tensor
    last: torch.Tensor
    max_length: int

    def rows(self, prompts) -> torch.Tensor:
        return torch.tensor([self.index[p] for p in prompts], dtype=torch.long, device=self.states.device)


def tokenize(tokenizer, prompts: list[str]):
    """Tokenise with padding to ``model_max_length``, warning about every prompt that had to be cut."""
    max_length = tokenizer.model_max_length
    inputs = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    full = tokenizer(prompts, truncation=False, verbose=False)["input_ids"]
    for prompt, ids in zip(prompts, full):
        if len(ids) > max_length:
            cut = tokenizer.decode(ids[max_length - 1 : -1])
            logger.warning(
                f"prompt {prompt!r} is longer than the tokenizer's limit of {max_length} tokens; this part was cut: "
                f"{cut!r}. Shorten the concept to edit all of it."
            )
    return inputs


@torch.no_grad()
def encode_prompts(
    tokenizer, text_encoder, prompts: list[str], *, causal_cut: bool, device=None, batch_size: int = 32,
    desc: str = "Encoding prompts",
) -> EncodedPrompts:
    """Encode every distinct prompt once, in batches, with the pipeline's tokenizer and text encoder.

    Args:
        tokenizer: the pipeline's tokenizer.
        text_encoder: the pipeline's text encoder; ``text_encoder(ids)[0]`` is what the pipeline conditions on.
        prompts (`list[str]`): prompts, duplicates allowed (each is encoded once).
        causal_cut (`bool`): cut the ids after the largest ``k`` (valid for causal encoders when only positions
            ``<= k`` are read).
        device: where to run the encoder (defaults to its own device).
        batch_size (`int`, defaults to 32): prompts per encoder call. Batches of length-sorted prompts are cut at their
            own longest prompt, so smaller batches waste less on padding; 32 short sequences still fill a GEMM.
    """
    distinct = list(dict.fromkeys(prompts))
    inputs = tokenize(tokenizer, distinct)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    last = mask.sum(-1) - 2
    max_length = ids.shape[-1]
    device = device if device is not None else text_encoder.device
    use_mask = getattr(text_encoder.config, "use_attention_mask", False)
    # With a causal encoder, prompts sorted by length are batched and each batch is cut after its own largest k:
    # the encoder sees about Σ (k + 1) tokens instead of len(prompts) · 77.
    order = torch.argsort(last, stable=True) if causal_cut else torch.arange(len(distinct))
    batches = [order[i : i + batch_size] for i in range(0, len(distinct), batch_size)]
    states = None
    for rows in tqdm(batches, desc=desc, disable=len(batches) < 4, leave=False):
        length = int(last[rows].max()) + 1 if causal_cut else max_length
        kwargs = {"attention_mask": mask[rows, :length].to(device)} if use_mask else {}
        out = text_encoder(ids[rows, :length].to(device), **kwargs)[0]
        if states is None:
            width = int(last.max()) + 1 if causal_cut else max_length
            states = out.new_zeros((len(distinct), width, out.shape[-1]))
        states[rows.to(out.device), :length] = out
    return EncodedPrompts(
        index={p: i for i, p in enumerate(distinct)}, states=states, last=last.to(states.device),
        max_length=max_length,
    )


def pair_positions(k_erase: torch.Tensor, k_guide: torch.Tensor, token_mode: str, max_length: int):
    """Token positions of erase→guide pairs.

    "last": one token per pair, ``(k(e), k(g))``. "paper": with ``f = max(k(e), k(g))`` the erased positions
    ``k(e) … L−1−(f−k(e))`` pair in order with the guide positions ``k(g) … L−1−(f−k(g))`` (``L`` = `max_length`).

    Returns:
        `tuple[torch.Tensor, torch.Tensor, torch.Tensor]`: pair index, erased position and guide position of every
        selected token.
    """
    if token_mode == "last":
        return torch.arange(len(k_erase), device=k_erase.device), k_erase, k_guide
    lengths = max_length - torch.maximum(k_erase, k_guide)
    pair = torch.repeat_interleave(torch.arange(len(k_erase), device=k_erase.device), lengths)
    offset = torch.arange(int(lengths.sum()), device=k_erase.device) - torch.repeat_interleave(
        torch.cumsum(lengths, 0) - lengths, lengths
    )
    return pair, k_erase[pair] + offset, k_guide[pair] + offset


def preserve_positions(k: torch.Tensor, token_mode: str, max_length: int):
    """Positions of preserved prompts: the last token ("last") or all `max_length` positions ("paper").

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: prompt index (into `k`) and position of every selected token.
    """
    if token_mode == "last":
        return torch.arange(len(k), device=k.device), k
    prompt = torch.arange(len(k), device=k.device).repeat_interleave(max_length)
    return prompt, torch.arange(max_length, device=k.device).repeat(len(k))

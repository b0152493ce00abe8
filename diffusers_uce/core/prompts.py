"""Prompt encoding and token selection.

Every distinct prompt of an edit is tokenised once (padded to the tokenizer's ``model_max_length``, or the family's
sequence length: 512 for FLUX's T5) and encoded in batches, one pass per text encoder of the pipeline. ``k(x)`` is the
index of the last real token of prompt ``x`` (attention-mask ones − 2; ``k("") = 0``: CLIP's start token, T5's end
token), from the first tokenizer when several encoders' states are concatenated (SDXL). The CLIP tower is causal, so
when only positions up to ``max k`` are needed ("last" mode) the ids are cut there: the states are the same and most
of the cost goes away. T5 is bidirectional and a pooled embedding reads the end token: those are never cut.
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
        max_length (`int`): the padded length (77 for CLIP, 512 for FLUX's T5, 1 for a pooled embedding).
        segments (`tuple[tuple[int, int], ...]`, *optional*): where the sequence joins the states of several text
            encoders one after the other (SD3's CLIP then T5 positions), as ``(offset, length)`` runs. `last` is then
            ``(num_prompts, num_segments)``: ``k`` of each prompt in each run, as positions of the whole sequence.
            Empty (the default): one run, and `last` holds one ``k`` per prompt.
    """

    index: dict[str, int]
    states: torch.Tensor
    last: torch.Tensor
    max_length: int
    segments: tuple[tuple[int, int], ...] = ()

    def rows(self, prompts) -> torch.Tensor:
        return torch.tensor([self.index[p] for p in prompts], dtype=torch.long, device=self.states.device)

    def pairs(self, rows_e: torch.Tensor, rows_g: torch.Tensor, token_mode: str):
        """`pair_positions` of erased prompts `rows_e` and their guides `rows_g`, in every run of the sequence: with
        several runs, each pair has tokens in each (its last token in each encoder, or each run's paired ends)."""
        if not self.segments:
            return pair_positions(self.last[rows_e], self.last[rows_g], token_mode, self.max_length)
        parts = [pair_positions(self.last[rows_e, s] - offset, self.last[rows_g, s] - offset, token_mode, length)
                 for s, (offset, length) in enumerate(self.segments)]
        pair = torch.cat([p for p, _, _ in parts])
        order = torch.argsort(pair, stable=True)
        pos_e = torch.cat([e + offset for (_, e, _), (offset, _) in zip(parts, self.segments)])
        pos_g = torch.cat([g + offset for (_, _, g), (offset, _) in zip(parts, self.segments)])
        return pair[order], pos_e[order], pos_g[order]

    def preserved(self, rows: torch.Tensor, token_mode: str):
        """`preserve_positions` of the prompts `rows`: their last token in every run ("last"), or every position."""
        if not self.segments or token_mode != "last":
            return preserve_positions(self.last[rows] if not self.segments else self.last[rows, 0], token_mode,
                                      self.max_length)
        count = len(self.segments)
        index = torch.arange(len(rows), device=rows.device).repeat_interleave(count)
        return index, self.last[rows].reshape(-1)

    def real_positions(self, row: int) -> torch.Tensor:
        """Positions of prompt `row`'s tokens up to its last one, in every run."""
        device = self.states.device
        if not self.segments:
            return torch.arange(int(self.last[row]) + 1, device=device)
        return torch.cat([torch.arange(offset, int(k) + 1, device=device)
                          for (offset, _), k in zip(self.segments, self.last[row].tolist())])


def tokenize(tokenizer, prompts: list[str], max_length: int | None = None):
    """Tokenise with padding to `max_length` (the tokenizer's ``model_max_length`` by default), warning about every
    prompt that had to be cut.

    Prompts are tokenised once; only those longer than `max_length` (rare) go through the tokenizer's truncation again.
    Returns ``{"input_ids", "attention_mask"}``, long tensors of shape ``(len(prompts), max_length)``.
    """
    max_length = max_length or tokenizer.model_max_length
    full = tokenizer(prompts, truncation=False, verbose=False)["input_ids"]
    long = [i for i, ids in enumerate(full) if len(ids) > max_length]
    for i in long:
        cut = tokenizer.decode(full[i][max_length - 1 : -1])
        logger.warning(
            f"prompt {prompts[i]!r} is longer than the tokenizer's limit of {max_length} tokens; this part was cut: "
            f"{cut!r}. Shorten the concept to edit all of it."
        )
    if getattr(tokenizer, "padding_side", "right") != "right" or tokenizer.pad_token_id is None:
        inputs = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
        return {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
    if long:  # the tokenizer's own truncation (which special tokens it keeps is its business)
        cut = tokenizer([prompts[i] for i in long], truncation=True, max_length=max_length)["input_ids"]
        for i, ids in zip(long, cut):
            full[i] = ids
    ids = torch.full((len(prompts), max_length), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), max_length), dtype=torch.long)
    for row, tokens in enumerate(full):
        ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        mask[row, : len(tokens)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def last_positions(mask: torch.Tensor) -> torch.Tensor:
    """``k`` of each padded prompt: attention-mask ones − 2, the last real token (0 for ``""``, with or without a start
    token: CLIP's ``""`` is start + end, T5's is the end token alone)."""
    return (mask.sum(-1) - 2).clamp(min=0)


def _states(text_encoder, ids, mask, output: str, use_mask: bool) -> torch.Tensor:
    kwargs = {"attention_mask": mask} if use_mask else {}
    if output == "penultimate":
        return text_encoder(ids, output_hidden_states=True, **kwargs).hidden_states[-2]
    out = text_encoder(ids, **kwargs)
    return out.pooler_output[:, None] if output == "pooled" else out[0]


@torch.no_grad()
def encode_prompts(
    encoders, prompts: list[str], *, causal_cut: bool, output: str = "last", max_length: int | None = None,
    device=None, batch_size: int | None = None, desc: str = "Encoding prompts",
) -> EncodedPrompts:
    """Encode every distinct prompt once, in batches, with the pipeline's tokenizer(s) and text encoder(s).

    Args:
        encoders (`list[tuple]`): ``(tokenizer, text_encoder)`` pairs; their states are concatenated along the feature
            axis (SDXL's two CLIP towers). ``k`` comes from the first tokenizer; a warning names the prompts where
            another tokenizer disagrees.
        prompts (`list[str]`): prompts, duplicates allowed (each is encoded once).
        causal_cut (`bool`): cut the ids after the largest ``k`` (valid for causal encoders when only positions
            ``<= k`` are read).
        output (`str`, defaults to `"last"`): `"last"` (``text_encoder(ids)[0]``), `"penultimate"`
            (``hidden_states[-2]``) or `"pooled"` (``pooler_output``, returned as a sequence of one token with
            ``k = 0``).
        max_length (`int`, *optional*): padded length (each tokenizer's ``model_max_length`` by default).
        device: where to run the encoders (defaults to the first one's device).
        batch_size (`int`, *optional*): prompts per encoder call; 32 on the CPU, 256 on an accelerator. Batches of
            length-sorted prompts are cut at their own longest prompt, so smaller batches waste less on padding; 32
            short sequences still fill a CPU GEMM, while a GPU needs larger batches to amortise each call's launches.

    Returns:
        [`EncodedPrompts`]: the states of each distinct prompt (concatenated over `encoders`) and its ``k``.
    """
    distinct = list(dict.fromkeys(prompts))
    inputs = [tokenize(tokenizer, distinct, max_length) for tokenizer, _ in encoders]
    lasts = [last_positions(i["attention_mask"]) for i in inputs]
    last = lasts[0]
    for number, ((tokenizer, _), other) in enumerate(zip(encoders[1:], lasts[1:]), start=2):
        differ = [p for p, a, b in zip(distinct, last.tolist(), other.tolist()) if a != b]
        if differ:
            logger.warning(
                f"the tokenizers disagree on the last token of {differ[:3]} ({len(differ)} prompt(s)): positions "
                f"follow the first tokenizer, so tokenizer {number} ({type(tokenizer).__name__}) contributes the "
                "states of other tokens there. Rephrase these concepts if both encoders should read the same word."
            )
    cut_at = torch.stack(lasts).amax(0)  # the largest k over tokenizers: every state read is computed
    device = torch.device(device if device is not None else encoders[0][1].device)
    batch_size = batch_size or (32 if device.type == "cpu" else 256)
    pooled = output == "pooled"
    causal_cut = causal_cut and not pooled
    # With a causal encoder, prompts sorted by length are batched and each batch is cut after its own largest k:
    # the encoder sees about Σ (k + 1) tokens instead of len(prompts) · 77.
    order = torch.argsort(cut_at, stable=True) if causal_cut else torch.arange(len(distinct))
    batches = [order[i : i + batch_size] for i in range(0, len(distinct), batch_size)]
    # One host-to-device copy per tokenizer (ids and mask sorted in batch order), then slices of it: no transfer or
    # synchronisation per batch; the lengths are read from host tensors.
    lengths = [int(cut_at[rows].max()) + 1 if causal_cut else None for rows in batches]
    on_device = [(t["input_ids"][order].to(device, non_blocking=True),
                  t["attention_mask"][order].to(device, non_blocking=True)) for t in inputs]
    states, start = None, 0
    for rows, length in tqdm(list(zip(batches, lengths)), desc=desc, disable=len(batches) < 4, leave=False):
        parts, end = [], start + len(rows)
        for (_, text_encoder), (ids, mask) in zip(encoders, on_device):
            use_mask = getattr(text_encoder.config, "use_attention_mask", False)
            parts.append(_states(text_encoder, ids[start:end, :length], mask[start:end, :length], output, use_mask))
        out = torch.cat([p.to(parts[0].device) for p in parts], dim=-1)
        if states is None:
            width = 1 if pooled else int(cut_at.max()) + 1 if causal_cut else out.shape[1]
            states = out.new_zeros((len(distinct), width, out.shape[-1]))
            where = order.to(out.device, non_blocking=True)
        states[where[start:end], : out.shape[1]] = out
        start = end
    return EncodedPrompts(
        index={p: i for i, p in enumerate(distinct)}, states=states,
        last=(torch.zeros_like(last) if pooled else last).to(states.device),
        max_length=1 if pooled else int(inputs[0]["input_ids"].shape[-1]),
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

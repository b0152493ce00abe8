"""The hidden states a pipeline's text encoders gave each prompt, kept so that a later solve encodes only new prompts.

Entries are keyed by target group and by a fingerprint of the text encoders and tokenizers that read the prompts
(their identity and, for every weight, its storage and version counter, which in-place changes bump): states of
encoders that changed since are never reused. Prompts encoded up to their last token (causal encoders, when only
that token is read) are kept that short; a request for full-length states encodes them again.
"""

from __future__ import annotations

import os
from collections import OrderedDict

import torch

from ..core.prompts import EncodedPrompts

# Default budget of the cache, in bytes (environment: DIFFUSERS_UCE_ENCODING_CACHE_MB).
DEFAULT_BUDGET = int(float(os.environ.get("DIFFUSERS_UCE_ENCODING_CACHE_MB", "512")) * 2**20)


def encoders_fingerprint(modules) -> tuple:
    """What identifies the state of text encoders and tokenizers: their identity, and every weight's storage, version
    counter, dtype and device. Cheap (no weight is read)."""
    out = []
    for module in modules:
        out.append(id(module))
        if isinstance(module, torch.nn.Module):
            out += [(t.data_ptr(), t._version, t.dtype, str(t.device))
                    for t in (*module.parameters(), *module.buffers())]
    return tuple(out)


class EncodingCache:
    """Per-prompt hidden states of one pipeline, within a byte budget (least recently used entries go first).

    Args:
        budget (`int`, *optional*): the most bytes of states kept; 512 MiB by default.
    """

    def __init__(self, budget: int = DEFAULT_BUDGET):
        self.budget = budget
        self.entries: OrderedDict[tuple, tuple[torch.Tensor, int, bool]] = OrderedDict()
        self.fingerprints: dict[str, tuple] = {}
        self.max_length: dict[str, int] = {}
        self.segments: dict[str, tuple] = {}
        self.size = 0

    def split(self, group: str, fingerprint: tuple, prompts: list[str], full: bool) -> list[str]:
        """The prompts of `prompts` that must be encoded (the others are cached, at full length if `full`)."""
        if self.fingerprints.get(group) != fingerprint:  # the encoders changed: their old states are stale
            for key in [k for k in self.entries if k[0] == group]:
                self.size -= self.entries.pop(key)[0].nbytes
            self.fingerprints[group] = fingerprint
        return [p for p in dict.fromkeys(prompts) if (group, p) not in self.entries
                or (full and not self.entries[(group, p)][2])]

    def store(self, group: str, encoded: EncodedPrompts, full: bool) -> None:
        """Keep the states of every prompt of `encoded` (up to its last token unless `full`)."""
        last = encoded.last.tolist()
        for prompt, row in encoded.index.items():
            states = encoded.states[row] if full else encoded.states[row, : last[row] + 1]
            key = (group, prompt)
            if key in self.entries:
                self.size -= self.entries.pop(key)[0].nbytes
            self.entries[key] = (states.clone(), last[row], full)
            self.size += states.nbytes
        self.max_length[group] = encoded.max_length
        self.segments[group] = encoded.segments

    def trim(self) -> None:
        """Drop the least recently used states until the cache fits its budget."""
        while self.size > self.budget and self.entries:
            self.size -= self.entries.popitem(last=False)[1][0].nbytes

    def encoded(self, group: str, prompts: list[str], full: bool) -> EncodedPrompts:
        """The cached states of `prompts` as one `EncodedPrompts` (padded with zeros past each prompt's own length)."""
        distinct = list(dict.fromkeys(prompts))
        rows = [self.entries[(group, p)] for p in distinct]
        for p in distinct:
            self.entries.move_to_end((group, p))
        max_length = self.max_length[group]
        longest = max(r[0].shape[0] for r in rows)  # pipelines that trim to a batch's longest prompt vary
        length = max(max_length, longest) if full else longest
        first = rows[0][0]
        states = first.new_zeros((len(rows), length, first.shape[-1]))
        for i, (row, _, _) in enumerate(rows):
            states[i, : row.shape[0]] = row[:length]
        last = torch.tensor([r[1] for r in rows], dtype=torch.long, device=first.device)
        return EncodedPrompts(index={p: i for i, p in enumerate(distinct)}, states=states, last=last,
                              max_length=max_length, segments=self.segments[group])


def clear_encoding_cache(pipe) -> None:
    """Forget every prompt state `pipe` has cached (benchmarks measuring a first solve call this)."""
    pipe.__dict__.pop("_uce_encodings", None)

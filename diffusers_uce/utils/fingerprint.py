"""Exact, cheap fingerprints of tensor contents, to tell whether weights changed since something was computed from
them, however they changed (`weight.data += ΔW`, as `fuse_lora` does, moves neither the tensor's version counter nor
its storage)."""

from __future__ import annotations

import torch

_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def checksum(tensor: torch.Tensor) -> torch.Tensor:
    """The integer sums of the bit patterns of `tensor` over each row and over each column (one row for a vector),
    as one int64 tensor on the CPU.

    Integer sums are exact and independent of the order of summation, so the same contents give the same checksum on
    every device, and a change of any entry changes its row's and column's sums (but for changes that cancel in both,
    which in-place updates such as a merged LoRA do not make). One read of the tensor, no float64 copy.
    """
    data = tensor.detach()
    bits = data.reshape(1, -1) if data.dim() < 2 else data.reshape(data.shape[0], -1)
    bits = bits.contiguous().view(_BITS[bits.element_size()])
    return torch.cat([bits.sum(1, dtype=torch.int64), bits.sum(0, dtype=torch.int64)]).cpu()


def fingerprint(tensors) -> list[torch.Tensor]:
    """`checksum` of each tensor of `tensors` (`None` entries are skipped)."""
    return [checksum(t) for t in tensors if t is not None]


def same_fingerprint(a: list[torch.Tensor] | None, b: list[torch.Tensor] | None) -> bool:
    """Whether two fingerprints are of the same contents (`False` when either is missing)."""
    return a is not None and b is not None and len(a) == len(b) and all(
        x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, b))

"""Exact, cheap fingerprints of tensor contents, to tell whether weights changed since something was computed from
them, however they changed (`weight.data += ΔW`, as `fuse_lora` does, moves neither the tensor's version counter nor
its storage)."""

from __future__ import annotations

import torch

_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def checksum(tensor: torch.Tensor) -> torch.Tensor:
    """The integer sum of the bit patterns of every entry of `tensor`, with its shape, as an int64 tensor on the CPU.

    An integer sum is exact and independent of the order of summation, so the same contents give the same checksum
    on every device, and a real in-place update (a merged LoRA, new weights loaded) changes it: only changes whose bit
    patterns cancel exactly would not. One read of the tensor (about 1.5 ms for 1280×2048 float32 on one CPU thread,
    0.2 s for every cross-attention projection of SDXL), no float64 copy.
    """
    data = tensor.detach().reshape(-1).contiguous()
    total = data.view(_BITS[data.element_size()]).sum(dtype=torch.int64)
    return torch.cat([torch.tensor(list(tensor.shape), dtype=torch.int64), total.reshape(1).cpu()])


def fingerprint(tensors) -> list[torch.Tensor]:
    """`checksum` of each tensor of `tensors` (`None` entries are skipped)."""
    return [checksum(t) for t in tensors if t is not None]


def same_fingerprint(a: list[torch.Tensor] | None, b: list[torch.Tensor] | None) -> bool:
    """Whether two fingerprints are of the same contents (`False` when either is missing)."""
    return a is not None and b is not None and len(a) == len(b) and all(
        x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, b))

"""Per-layer low-rank transforms ``T_ℓ = I + Uᵀ D_ℓ`` (precise erasure), in pure torch.

``U`` (m×d) is shared by every layer and ``D_ℓ`` (m×d) is per layer (or one for all): ``W'_ℓ = W_ℓ + (W_ℓ Uᵀ) D_ℓ``
is an exact rank-m LoRA with ``up_ℓ = W_ℓ Uᵀ`` and ``down_ℓ = D_ℓ``. Every operation here works on all layers at once:
the weights are stacked along rows (``W_all``, with the layer of each row), and layers with as many rows form one
batched product.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..utils.checks import all_finite


@dataclass
class Layerwise:
    """``T_ℓ − I = upᵀ down[ℓ]``.

    Args:
        up (`torch.Tensor`): shared tokens ``U``, shape ``(m, d)``.
        down (`torch.Tensor`): ``D_ℓ``, shape ``(num_layers, m, d)``, or ``(1, m, d)`` when shared by every layer.
    """

    up: torch.Tensor
    down: torch.Tensor

    def times(self, scale: float) -> "Layerwise":
        """The change at strength ``s``: ``I + s·(T_ℓ − I)``."""
        return Layerwise(self.up * scale, self.down)

    def to(self, device=None, dtype=None) -> "Layerwise":
        return Layerwise(self.up.to(device=device, dtype=dtype), self.down.to(device=device, dtype=dtype))

    def homogeneous(self) -> "Layerwise":
        """The same change for ``[W | b]`` and tokens ``[c; 1]``: zero-padded, so ``b`` is left as it is."""
        pad = torch.nn.functional.pad
        return Layerwise(pad(self.up, (0, 1)), pad(self.down, (0, 1)))

    def is_finite(self) -> bool:
        return all_finite(self.up, self.down)

    def layer_down(self, layer: int) -> torch.Tensor:
        return self.down[layer if self.down.shape[0] > 1 else 0]


@dataclass
class StackedWeights:
    """``W_all`` with the layer of each row: what the report needs to measure a per-layer edit."""

    weights: torch.Tensor
    row_layer: torch.Tensor


def layer_blocks(row_layer: torch.Tensor, num_layers: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Layers grouped by their number of rows: for each block, its layers ``(g,)`` and their row indices ``(g, c)``."""
    counts = torch.bincount(row_layer, minlength=num_layers)
    order = torch.argsort(row_layer, stable=True)
    offsets = torch.cumsum(counts, 0) - counts
    blocks = []
    for count in torch.unique(counts).tolist():
        layers = (counts == count).nonzero().squeeze(1)
        blocks.append((layers, order[offsets[layers, None] + torch.arange(count, device=row_layer.device)]))
    return blocks


def per_row(left: torch.Tensor, right: torch.Tensor, row_layer: torch.Tensor) -> torch.Tensor:
    """``left[r] @ right[layer(r)]`` for every row ``r`` (``left`` ``(R, m)``, ``right`` ``(L|1, m, k)``)."""
    if right.shape[0] == 1:
        return left @ right[0]
    out = left.new_zeros(left.shape[0], right.shape[-1])
    for layers, index in layer_blocks(row_layer, right.shape[0]):
        out[index] = left[index] @ right[layers]
    return out


def add_layerwise(out: torch.Tensor, weights: torch.Tensor, change: Layerwise, row_layer: torch.Tensor):
    """``out += (W_all Uᵀ) D_ℓ`` in the dtype of `out` (in place) and return it."""
    compute = out.dtype
    y = weights.to(compute) @ change.up.to(compute).T
    return out.add_(per_row(y, change.down.to(compute), row_layer))


def layerwise_inputs(x: torch.Tensor, change: Layerwise, layer: int) -> torch.Tensor:
    """``x (T_ℓ − I)ᵀ = (x D_ℓᵀ) U`` for row tokens `x` (in the dtype of `x`)."""
    return (x @ change.layer_down(layer).to(x).T) @ change.up.to(x)


def layerwise_distances(stacked: StackedWeights, change: Layerwise, x: torch.Tensor, y: torch.Tensor,
                        chunk_size: int = 256) -> torch.Tensor:
    """``Σ_ℓ ‖W_ℓ T_ℓ x_k − W_ℓ y_k‖²`` for each row ``k`` of `x`/`y`, in float64 (no layer's d×d is formed)."""
    w = stacked.weights.to(torch.float64)
    up, down = change.up.to(w), change.down.to(w)
    wu = w @ up.T  # (R, m)
    out = []
    for start in range(0, x.shape[0], chunk_size):
        xs, ys = x[start : start + chunk_size].to(w), y[start : start + chunk_size].to(w)
        z = (xs - ys) @ w.T + per_row(wu, down @ xs.T, stacked.row_layer).T  # (k, R)
        out.append((z * z).sum(1))
    return torch.cat(out) if out else x.new_zeros(0, dtype=torch.float64)

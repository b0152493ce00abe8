"""LoRA factorisation of an edit's weight changes, in pure torch (the math of `save_concept_edits_as_lora`).

A UCE edit changes a layer by ``ΔW_ℓ = W_ℓ (T_ℓ − I)``, of rank at most the number of edit tokens: an
exact LoRA. With a transform shared by every layer one SVD of the d×d ``T − I`` serves all layers
(`shared_low_rank`); with per-layer corrections each layer gets its own (`per_layer_low_rank`). Past the exact rank,
the truncated SVD is the best approximation (Eckart–Young). Split from `solve.py`, which holds the edit's math.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .layerwise import Layerwise, add_layerwise


@dataclass
class LowRankFactors:
    """Low-rank factors of the weight changes: ``ΔW_ℓ ≈ up[ℓ] @ down[ℓ]`` (a LoRA with scale 1).

    Args:
        up (`list[torch.Tensor]`): per layer, ``(out_ℓ, r_ℓ)`` float64 (LoRA ``B``).
        down (`list[torch.Tensor]`): per layer, ``(r_ℓ, d)`` float64 (LoRA ``A``); the same tensor for every layer when
            the edit is one shared transform.
        exact_rank (`list[int]`): per layer, the numerical rank of the exact change.
        relative_error (`float`): ``‖ΔW_approx − ΔW‖_F / ‖ΔW‖_F`` over all layers together (0 when exact).
    """

    up: list[torch.Tensor]
    down: list[torch.Tensor]
    exact_rank: list[int]
    relative_error: float

    @property
    def rank(self) -> list[int]:
        return [d.shape[0] for d in self.down]


def numerical_rank(singular_values: torch.Tensor, rtol: float = 1e-9) -> int:
    """Number of singular values above ``rtol`` times the largest (0 for a zero matrix); values sorted descending."""
    if singular_values.numel() == 0 or float(singular_values[0]) <= 0:
        return 0
    return int((singular_values > rtol * singular_values[0]).sum())


def shared_low_rank(
    weights: torch.Tensor | Sequence[torch.Tensor], sizes: list[int], delta: torch.Tensor, rank: int | None = None,
    rtol: float = 1e-9,
) -> LowRankFactors:
    """LoRA factors of ``ΔW_ℓ = W_ℓ Δ`` for a transform shared by every layer (``Δ = T_s − I``, rank ≤ edit tokens;
    ``Δ`` may have fewer columns than rows: a biased layer's ``[W | b]`` times the first d columns of ``T̃ − I``).

    One float64 SVD ``Δ = U S Vᵀ`` of the d×d matrix serves all layers: ``down = (S Vᵀ)[:r]`` is shared and
    ``up_ℓ = W_ℓ U[:, :r]`` comes from one matmul over the stacked weights. ``r`` is the numerical rank of ``Δ`` or
    `rank` when smaller (the truncated SVD is the best rank-``r`` approximation of ``Δ``). The error is computed with
    the Gram ``G = W_allᵀ W_all``: ``‖W_all Δ‖² = tr(Δᵀ G Δ)``, the dropped part ``W_all U_t S_t`` likewise.

    Args:
        weights (`torch.Tensor` or list of `torch.Tensor`): ``W_all`` (R×d), the original weights of every layer
            stacked along rows, or each layer's (out_ℓ×d, any dtype): then only one layer at a time is upcast to
            float64, and the extra memory stays about one layer's.
        sizes (`list[int]`): number of rows of each layer in `weights`.
        delta (`torch.Tensor`): ``Δ`` (d×d).
        rank (`int`, *optional*): the largest rank to keep.
        rtol (`float`, defaults to 1e-9): singular values below ``rtol·σ_max`` count as zero.
    """
    from .robust import stacked_gram  # here: robust imports solve, which this module's users import first

    delta = delta.to(torch.float64)
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    exact = numerical_rank(s, rtol)
    r = exact if rank is None else min(rank, exact)
    down = s[:r, None] * vh[:r]
    if isinstance(weights, torch.Tensor):
        w = weights.to(device=delta.device, dtype=torch.float64)
        ups, gram = list((w @ u[:, :r]).split(sizes)), w.T @ w
    else:
        ups = [w.to(device=delta.device, dtype=torch.float64) @ u[:, :r] for w in weights]
        gram = stacked_gram([w.to(device=delta.device) for w in weights])
    total = float(((gram @ delta) * delta).sum())
    tail = u[:, r:] * s[r:]
    dropped = float(((gram @ tail) * tail).sum())
    error = (max(dropped, 0.0) / total) ** 0.5 if total > 0 else 0.0
    return LowRankFactors(up=ups, down=[down] * len(sizes), exact_rank=[exact] * len(sizes), relative_error=error)


def per_layer_low_rank(deltas: list[torch.Tensor], rank: int | None = None, rtol: float = 1e-9) -> LowRankFactors:
    """LoRA factors of per-layer changes ``ΔW_ℓ`` (e.g. the "tensor" technique): one SVD per layer, batched by shape.

    ``ΔW_ℓ = U S Vᵀ`` gives ``up_ℓ = U[:, :r_ℓ]`` and ``down_ℓ = (S Vᵀ)[:r_ℓ]`` with ``r_ℓ`` the numerical rank of
    ``ΔW_ℓ``, or `rank` when smaller (Eckart–Young: the best rank-``r`` approximation of each layer).

    Args:
        deltas (`list[torch.Tensor]`): ``ΔW_ℓ`` (out_ℓ×d) per layer.
        rank (`int`, *optional*): the largest rank to keep per layer.
        rtol (`float`, defaults to 1e-9): singular values below ``rtol·σ_max`` of the layer count as zero.
    """
    ups, downs, exact = [None] * len(deltas), [None] * len(deltas), [0] * len(deltas)
    dropped = total = 0.0
    groups: dict[tuple, list[int]] = {}
    for i, delta in enumerate(deltas):
        groups.setdefault(tuple(delta.shape), []).append(i)
    for indices in groups.values():
        u, s, vh = torch.linalg.svd(torch.stack([deltas[i] for i in indices]).to(torch.float64), full_matrices=False)
        for k, i in enumerate(indices):
            exact[i] = numerical_rank(s[k], rtol)
            r = exact[i] if rank is None else min(rank, exact[i])
            ups[i], downs[i] = u[k, :, :r], s[k, :r, None] * vh[k, :r]
            dropped += float((s[k, r:] ** 2).sum())
            total += float((s[k] ** 2).sum())
    error = (dropped / total) ** 0.5 if total > 0 else 0.0
    return LowRankFactors(up=ups, down=downs, exact_rank=exact, relative_error=error)


def layerwise_low_rank(weights: torch.Tensor, row_layer: torch.Tensor, sizes: list[int], change: Layerwise,
                       width: int, rank: int | None = None) -> LowRankFactors:
    """LoRA factors of a precise-erasure change ``ΔW_ℓ = (W_ℓ Uᵀ) D_ℓ``: exactly ``up_ℓ = W_ℓ Uᵀ``, ``down_ℓ = D_ℓ``
    (rank = number of erased tokens), or the per-layer truncated SVD when `rank` is smaller.

    Args:
        weights (`torch.Tensor`): ``W_all`` (or ``[W | b]`` for a biased group, whose bias is left unchanged).
        width (`int`): the columns of ``W`` (the LoRA's input width).
    """
    m = change.up.shape[0]
    if rank is not None and rank < m:
        delta = add_layerwise(torch.zeros_like(weights, dtype=torch.float64), weights, change, row_layer)
        return per_layer_low_rank(list(delta[:, :width].split(sizes)), rank)
    ups = list((weights.to(torch.float64) @ change.up.to(torch.float64).T).split(sizes))
    downs = [change.layer_down(i)[:, :width].to(torch.float64) for i in range(len(sizes))]
    return LowRankFactors(up=ups, down=downs, exact_rank=[m] * len(sizes), relative_error=0.0)

"""The solve of wide target groups in low-rank form: no d×d matrix is ever built.

A group's ``B = λI + Uᵀ diag(s) U`` has ``U = [C; P]`` (``k = n + m`` token rows) and ``s = [w; w_p]``. With
``V = diag(s)^{1/2} U`` the Woodbury identity gives ``B⁻¹ = (1/λ)(I − Vᵀ K⁻¹ V)`` with ``K = λI + V Vᵀ`` (k×k, SPD
for λ > 0 and non-negative weights), so ``X B⁻¹`` for any rows ``X`` costs k×k solves and k×d products. The edit
``T − I = (C* − C)ᵀ diag(w) · C B⁻¹`` (the preserve terms cancel) is then stored as a `Layerwise` change
``T_ℓ − I = upᵀ down_ℓ`` with ``up = diag(w)(C* − C)`` and ``down = C B⁻¹``, to which the "tensor" technique and
debiasing add their per-layer rows.

When a group takes this path: when its tokens are fewer than half its width (``2k < d``, so the rank-k form is smaller
than ``T``) and the group is wide: ``d ≥ LOW_RANK_MIN_WIDTH`` (FLUX.2's 15,360-wide input, whose d×d float64 is
1.9 GB), or ``d ≥ LOW_RANK_MIN_WIDTH_PER_LAYER`` for a group of a family with one group per layer (HiDream's ~49
caption projections), where dozens of d×d transforms would be stored. Groups whose layers keep a bias in their
targets (FLUX.1) always use the dense solve.
"""

from __future__ import annotations

import torch

from ..utils.checks import all_finite
from .layerwise import Layerwise
from .solve import Correction, EditTerms

# A single group at least this wide is solved in low-rank form (a d×d float64 is then ≥ 512 MB).
LOW_RANK_MIN_WIDTH = 8192
# A group of a family with one group per layer (dozens of them) at least this wide is solved in low-rank form.
LOW_RANK_MIN_WIDTH_PER_LAYER = 2048


def is_wide(width: int, per_layer: bool = False) -> bool:
    """Whether a group whose layers read `width`-wide tokens is too wide for d×d algebra (see the module docstring);
    `per_layer`: the group is one of a family's per-layer groups."""
    return width >= (LOW_RANK_MIN_WIDTH_PER_LAYER if per_layer else LOW_RANK_MIN_WIDTH)


def takes_low_rank(width: int, num_tokens: int, per_layer: bool = False) -> bool:
    """Whether a group is solved in low-rank form: wide (`is_wide`) with fewer than ``width / 2`` tokens."""
    return is_wide(width, per_layer) and 2 * num_tokens < width


class WoodburyInverse:
    """``X ↦ X B⁻¹`` for ``B = λI + Uᵀ diag(s) U`` without forming ``B`` (float64).

    Args:
        terms (`EditTerms`): the solve inputs (``U = [C; P]``, ``s = [w; w_p]``, λ).
    """

    def __init__(self, terms: EditTerms):
        if terms.lamb <= 0:
            raise ValueError(f"lamb must be > 0 (got {terms.lamb}); it keeps the solve well posed, use e.g. 0.5")
        tokens = torch.cat([terms.erase, terms.preserve]).to(torch.float64)
        weights = torch.cat([terms.erase_weight, terms.preserve_weight]).to(tokens)
        if bool((weights < 0).any()):
            raise ValueError("the UCE system needs non-negative erase/preserve scales; nothing was changed")
        self.lamb = float(terms.lamb)
        self.v = tokens * weights.sqrt()[:, None]  # V = S^{1/2} U, (k, d)
        inner = self.v @ self.v.T
        inner.diagonal().add_(self.lamb)
        if not all_finite(self.v, inner):
            raise ValueError("the UCE system has non-finite entries (overflowing scales or non-finite tokens); "
                             "nothing was changed: lower erase_scale/preserve_scale")
        self.factor, info = torch.linalg.cholesky_ex(inner)
        if int(info) != 0:
            raise ValueError("the UCE system is not positive definite (or overflows to non-finite values); nothing "
                             "was changed: use lamb > 0 and moderate erase/preserve scales")

    def solve_rows(self, x: torch.Tensor) -> torch.Tensor:
        """``X B⁻¹`` for rows `x` (r×d), float64: ``(1/λ)(X − (X Vᵀ) K⁻¹ V)``."""
        x = x.to(self.v)
        projected = torch.cholesky_solve((x @ self.v.T).T.contiguous(), self.factor).T  # (X Vᵀ) K⁻¹, K symmetric
        return (x - projected @ self.v) / self.lamb


def as_layerwise(shared: Correction, correction: Correction | None = None) -> Layerwise:
    """``T_ℓ − I`` as a `Layerwise` change from the shared low-rank delta (`solve.low_rank_delta`, one coefficient
    row) and an optional per-layer correction (``Cᵀ diag(coef_ℓ) D``): ``up = [diag(w)(C* − C); C]``,
    ``down_ℓ = [C B⁻¹; diag(coef_ℓ) D]`` (one ``down`` for every layer without a correction)."""
    up = shared.tokens * shared.coef[0][:, None]
    if correction is None:
        return Layerwise(up, shared.solved[None])
    layers = correction.coef.shape[0]
    down = torch.cat([shared.solved[None].expand(layers, -1, -1),
                      correction.coef[:, :, None] * correction.solved[None]], dim=1)
    return Layerwise(torch.cat([up, correction.tokens.to(up)]), down)

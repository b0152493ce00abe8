"""The closed-form UCE math, in pure torch (no diffusers import).

Notation. Tokens are rows: ``C`` (n×d) erased tokens, ``C*`` (n×d) the matching guide tokens,
``P`` (m×d) preserved tokens, with per-token weights ``w`` (the erase scale of the edit each token came from) and
``w_p`` (its preserve scale). For a target layer ``W`` (out×d) UCE minimises

    λ‖W' − W‖² + Σ_i w_i ‖W' c_i − v*_i‖² + Σ_j w_pj ‖W' p_j − W p_j‖²

whose solution is ``W' = (λW + Σ_i w_i v*_i c_iᵀ + Σ_j w_pj W p_j p_jᵀ) B⁻¹`` with
``B = λI + Cᵀ diag(w) C + Pᵀ diag(w_p) P``. With ``v*_i = W c*_i`` ("replace") every layer shares one transform

    W' = W T,    T = (λI + C*ᵀ diag(w) C + Pᵀ diag(w_p) P) B⁻¹.

With ``v*_i = W c*_i − α_ℓi W c_i`` ("tensor", α over the token block of pair i) a layer ℓ gets
``T_ℓ = T + Cᵀ diag(a_ℓ) D`` with ``D = C B⁻¹`` and ``a_ℓ = −w ⊙ α_ℓ[pair]``: the shared transform plus a per-layer
low-rank correction. Everything here works on all layers at once: weights are concatenated along their output
dimension (``W_all``, rows of layer ℓ form one contiguous segment) so that one matmul serves every layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..utils.checks import all_finite
from .layerwise import Layerwise, add_layerwise, layerwise_inputs


@dataclass
class EditTerms:
    """All token-level inputs of one joint solve.

    Args:
        erase (`torch.Tensor`): erased tokens ``C``, shape ``(n, d)``.
        guide (`torch.Tensor`): guide tokens ``C*`` paired row by row with `erase`, shape ``(n, d)``.
        erase_weight (`torch.Tensor`): erase scale of each erased token, shape ``(n,)``.
        preserve (`torch.Tensor`): preserved tokens ``P``, shape ``(m, d)``.
        preserve_weight (`torch.Tensor`): preserve scale of each preserved token, shape ``(m,)``.
        tensor_pair (`torch.Tensor`): for each erased token, the index of its concept pair when the pair uses the
            "tensor" technique, ``-1`` for "replace"; shape ``(n,)``, dtype long.
        lamb (`float`): the regulariser ``λ`` (> 0).
    """

    erase: torch.Tensor
    guide: torch.Tensor
    erase_weight: torch.Tensor
    preserve: torch.Tensor
    preserve_weight: torch.Tensor
    tensor_pair: torch.Tensor
    lamb: float


@dataclass
class Correction:
    """Per-layer low-rank correction ``T_ℓ = T + Cᵀ diag(coef[ℓ]) D`` (the "tensor" technique).

    Args:
        tokens (`torch.Tensor`): ``C`` restricted to the tensor-technique tokens, shape ``(r, d)``.
        solved (`torch.Tensor`): ``D = C B⁻¹`` for the same tokens, shape ``(r, d)``.
        coef (`torch.Tensor`): per-layer coefficients, shape ``(num_layers, r)``.
    """

    tokens: torch.Tensor
    solved: torch.Tensor
    coef: torch.Tensor

    def times(self, scale: float) -> "Correction":
        """The correction at strength ``s`` (its coefficients times ``s``)."""
        return Correction(self.tokens, self.solved, self.coef * scale)


def solve_transform(terms: EditTerms) -> tuple[torch.Tensor, torch.Tensor]:
    """Solve for the shared transform ``T`` in float64.

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: ``T`` (d×d) and the Cholesky factor ``L`` of ``B`` (d×d), both float64
        on the device of the inputs.
    """
    erase, guide, preserve = (t.to(torch.float64) for t in (terms.erase, terms.guide, terms.preserve))
    w = terms.erase_weight.to(erase)
    wp = terms.preserve_weight.to(erase)
    weighted_erase = erase * w[:, None]
    preserve_gram = (preserve * wp[:, None]).T @ preserve
    return transform_from_sums(weighted_erase.T @ erase, guide.T @ weighted_erase, preserve_gram, terms.lamb)


def transform_from_sums(erase_gram: torch.Tensor, cross: torch.Tensor, preserve_gram: torch.Tensor,
                        lamb: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`solve_transform` from the token sums instead of the tokens (d×d each, float64), whatever their number.

    Args:
        erase_gram (`torch.Tensor`): ``Cᵀ diag(w) C``.
        cross (`torch.Tensor`): ``C*ᵀ diag(w) C``.
        preserve_gram (`torch.Tensor`): ``Pᵀ diag(w_p) P``.
        lamb (`float`): the regulariser ``λ`` (> 0).

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: ``T = (λI + C*ᵀWC + PᵀW_pP)(λI + CᵀWC + PᵀW_pP)⁻¹`` and the Cholesky
        factor of ``B = λI + CᵀWC + PᵀW_pP``, as `solve_transform`.
    """
    if lamb <= 0:
        raise ValueError(f"lamb must be > 0 (got {lamb}); it keeps the solve well posed, use e.g. 0.5")
    b, numerator = erase_gram + preserve_gram, cross + preserve_gram
    b.diagonal().add_(lamb)
    numerator.diagonal().add_(lamb)
    if not all_finite(b, numerator):
        raise ValueError("the UCE system has non-finite entries (overflowing scales or non-finite tokens); "
                         "nothing was changed: lower erase_scale/preserve_scale")
    factor, info = torch.linalg.cholesky_ex(b)
    if int(info) != 0:
        raise ValueError(
            "the UCE system is not positive definite (or overflows to non-finite values); nothing was changed: use "
            "lamb > 0 and non-negative, moderate erase/preserve scales"
        )
    transform = torch.cholesky_solve(numerator.T.contiguous(), factor).T  # T = M B⁻¹, B symmetric
    return transform, factor


def solve_rows(x: torch.Tensor, factor) -> torch.Tensor:
    """``X B⁻¹`` for rows `x`, in float64: `factor` is the Cholesky factor of ``B`` (`solve_transform`) or an object
    with a ``solve_rows`` method (`wide.WoodburyInverse`, which never forms ``B``)."""
    if hasattr(factor, "solve_rows"):
        return factor.solve_rows(x)
    return torch.cholesky_solve(x.to(torch.float64).T.contiguous(), factor).T  # B symmetric


def tensor_correction(
    weights: torch.Tensor, row_layer: torch.Tensor, num_layers: int, terms: EditTerms, factor: torch.Tensor,
    chunk_size: int = 4096,
) -> Correction | None:
    """Per-layer correction of the "tensor" technique, or `None` when no pair uses it.

    Args:
        weights (`torch.Tensor`): ``W_all``, the original weights of every layer concatenated along rows, ``(R, d)``.
        row_layer (`torch.Tensor`): layer index of each row of `weights`, ``(R,)``.
        num_layers (`int`): number of layers.
        terms (`EditTerms`): the solve inputs.
        factor (`torch.Tensor`): Cholesky factor of ``B`` from `solve_transform` (or see `solve_rows`).
    """
    selected = terms.tensor_pair >= 0
    if not bool(selected.any()):
        return None
    pair = terms.tensor_pair[selected]
    _, pair = torch.unique(pair, return_inverse=True)
    num_pairs = int(pair.max()) + 1
    tokens = terms.erase[selected].to(torch.float64)
    guides = terms.guide[selected].to(torch.float64)
    compute = weights.dtype
    inner = torch.zeros(num_layers, tokens.shape[0], dtype=torch.float64, device=weights.device)
    norm = torch.zeros_like(inner)
    for start in range(0, tokens.shape[0], chunk_size):  # bounded memory; one matmul per chunk for all layers
        y = weights @ tokens[start : start + chunk_size].to(compute).T
        y_star = weights @ guides[start : start + chunk_size].to(compute).T
        inner[:, start : start + chunk_size].index_add_(0, row_layer, (y * y_star).to(torch.float64))
        norm[:, start : start + chunk_size].index_add_(0, row_layer, (y * y).to(torch.float64))
    pair_inner = torch.zeros(num_layers, num_pairs, dtype=torch.float64, device=weights.device)
    pair_norm = torch.zeros_like(pair_inner)
    pair_inner.index_add_(1, pair, inner)
    pair_norm.index_add_(1, pair, norm)
    alpha = pair_inner / pair_norm.clamp_min(torch.finfo(torch.float64).tiny)
    coef = -terms.erase_weight[selected].to(torch.float64)[None, :] * alpha[:, pair]
    return Correction(tokens=tokens, solved=solve_rows(tokens, factor), coef=coef)  # D = C B⁻¹


def layer_norms(weights: torch.Tensor, row_layer: torch.Tensor, num_layers: int, tokens: torch.Tensor) -> torch.Tensor:
    """``‖W_ℓ x‖`` for every layer and token: one matmul for all layers, then per-layer sums; ``(L, n)`` float64."""
    y = weights @ tokens.to(weights.dtype).T
    squares = torch.zeros(num_layers, tokens.shape[0], dtype=torch.float64, device=weights.device)
    return squares.index_add_(0, row_layer, (y * y).to(torch.float64)).sqrt()


def debias_correction(
    weights: torch.Tensor, row_layer: torch.Tensor, num_layers: int, concepts: torch.Tensor,
    attributes: torch.Tensor, concept_of: torch.Tensor, weight: torch.Tensor, factor: torch.Tensor,
) -> Correction | None:
    """Per-layer correction of debiasing: the concept's target is ``W_ℓ (c_i + Σ_a β_ℓia c_a)``.

    Each concept token ``c_i`` is solved as an erase pair with itself as guide; its attribute tokens ``c_a`` add
    ``Σ_a β_ℓia W_ℓ c_a`` to its target, with the paper's per-layer normalisation
    ``β_ℓia = w_ia ‖W_ℓ c_i‖ / ‖W_ℓ c_a‖``. In ``W'_ℓ = (… + s_e Σ_i v*_i c_iᵀ …) B⁻¹`` that is
    ``T_ℓ = T + Σ_(i,a) s_e β_ℓia c_a (B⁻¹ c_i)ᵀ``: a `Correction` with one row per (concept, attribute).

    Args:
        concepts (`torch.Tensor`): concept tokens ``c_i``, ``(m, d)``.
        attributes (`torch.Tensor`): attribute tokens, one row per (concept, attribute), ``(q, d)``.
        concept_of (`torch.Tensor`): for each attribute row, the index of its concept token, ``(q,)``.
        weight (`torch.Tensor`): ``s_e · w_ia`` per attribute row, ``(q,)``.
        factor (`torch.Tensor`): Cholesky factor of ``B``.
    """
    if attributes.shape[0] == 0:
        return None
    concepts, attributes = concepts.to(torch.float64), attributes.to(torch.float64)
    norm_c = layer_norms(weights, row_layer, num_layers, concepts)[:, concept_of]
    norm_a = layer_norms(weights, row_layer, num_layers, attributes)
    coef = weight.to(torch.float64)[None, :] * norm_c / norm_a.clamp_min(torch.finfo(torch.float64).tiny)
    return Correction(tokens=attributes, solved=solve_rows(concepts[concept_of], factor), coef=coef)  # (B⁻¹ c_i)ᵀ


def combine(*corrections: Correction | None) -> Correction | None:
    """Stack corrections (their rows add up): ``T_ℓ = T + Σ_k C_kᵀ diag(coef_kℓ) D_k``."""
    parts = [c for c in corrections if c is not None]
    if len(parts) <= 1:
        return parts[0] if parts else None
    return Correction(tokens=torch.cat([c.tokens for c in parts]), solved=torch.cat([c.solved for c in parts]),
                      coef=torch.cat([c.coef for c in parts], dim=1))


def bias_direction(terms: EditTerms, factor: torch.Tensor) -> torch.Tensor:
    """``u = B⁻¹ (Σ_i w_i c_i + Σ_j w_pj p_j)``: the edit of a layer with a kept bias ``b``.

    The reference scripts keep ``b`` and put it in every target (``v*_i + b``, ``W p_j + b``), which gives
    ``W' = W T_ℓ + b uᵀ``, whatever the technique.
    """
    erase, preserve = terms.erase.to(torch.float64), terms.preserve.to(torch.float64)
    total = terms.erase_weight.to(erase) @ erase + terms.preserve_weight.to(erase) @ preserve
    return torch.cholesky_solve(total[:, None], factor)[:, 0]


def with_bias(transform: torch.Tensor, correction: Correction | None, u: torch.Tensor):
    """The homogeneous form of a biased edit, so biased layers need no special case anywhere else.

    A layer ``y = W c + b`` is ``[W | b] [c; 1]``; its edit ``W' = W T_ℓ + b uᵀ`` (bias kept) is
    ``[W | b] T̃_ℓ`` with ``T̃ = [[T, 0], [uᵀ, 1]]`` and the correction padded with a zero column. Strength,
    fusing, LoRA factors and the report then work unchanged on ``[W | b]`` and tokens ``[c; 1]``.

    Returns:
        `tuple[torch.Tensor, Correction | None]`: ``T̃`` ((d+1)×(d+1)) and the padded correction.
    """
    d = transform.shape[0]
    out = torch.zeros(d + 1, d + 1, dtype=transform.dtype, device=transform.device)
    out[:d, :d], out[d, :d], out[d, d] = transform, u.to(transform), 1
    if correction is not None:
        correction = Correction(homogeneous(correction.tokens, 0.0), homogeneous(correction.solved, 0.0),
                                correction.coef)
    return out, correction


def homogeneous(x: torch.Tensor, value: float = 1.0) -> torch.Tensor:
    """Append a constant feature to every token: ``[x, value]`` (``[c; 1]`` for a biased layer)."""
    return torch.nn.functional.pad(x, (0, 1), value=value)


def scaled(transform, correction: Correction | None, scale: float):
    """Strength ``s``: ``T_s = I + s (T − I)`` (and the correction times ``s``); a low-rank ``T − I`` (a shared
    `Correction`, see `low_rank_delta`) is simply multiplied by ``s``."""
    if isinstance(transform, Correction):
        transform = transform.times(scale)
    else:
        eye = torch.eye(transform.shape[0], dtype=transform.dtype, device=transform.device)
        transform = eye + scale * (transform - eye)
    return transform, None if correction is None else correction.times(scale)


def low_rank_delta(terms: EditTerms, factor: torch.Tensor) -> Correction:
    """``T − I = (C* − C)ᵀ diag(w) · C B⁻¹`` as a `Correction` with one coefficient row shared by every layer.

    Its rank is at most the number of erased tokens ``n``: writing ``W + (W (C* − C)ᵀ diag(w)) (C B⁻¹)`` costs
    ``O(R·d·n)`` instead of the ``O(R·d²)`` of ``W T``, the bulk of fusing SDXL's 140 projections when ``n ≪ d``.
    """
    erase = terms.erase.to(torch.float64)
    return Correction(terms.guide.to(erase) - erase, solve_rows(erase, factor), terms.erase_weight.to(erase)[None])


def edited_weights(
    weights: torch.Tensor, transform, correction: Correction | None = None,
    row_layer: torch.Tensor | None = None, chunk_size: int = 4096, layerwise: Layerwise | None = None,
) -> torch.Tensor:
    """``W_ℓ T_ℓ`` for every layer at once, in the dtype of `weights` (use float32 or float64).

    Args:
        weights (`torch.Tensor`): ``W_all`` (R×d).
        transform (`torch.Tensor` or `Correction`): the shared ``T`` (d×d), or ``T − I`` in low-rank form
            (`low_rank_delta`).
        correction (`Correction`, *optional*): the per-layer correction of the "tensor" technique.
        row_layer (`torch.Tensor`, *optional*): layer index of each row; needed with `correction` or `layerwise`.
        layerwise (`Layerwise`, *optional*): a per-layer low-rank change ``Uᵀ D_ℓ`` added to ``T_ℓ`` (precise
            erasure), usually with ``transform=None`` (``T = I``).
    """
    compute = weights.dtype
    low_rank = isinstance(transform, Correction)
    out = None if low_rank or transform is None else weights @ transform.to(compute)
    for part in ((transform,) if low_rank else ()) + (correction,):
        if part is None:
            continue
        for start in range(0, part.tokens.shape[0], chunk_size):  # W_all (C_ℓᵀ diag(coef_ℓ) D), chunked over tokens
            chunk = slice(start, start + chunk_size)
            y = weights @ part.tokens[chunk].to(compute).T
            coef = part.coef[:, chunk].to(compute)
            y, solved = y * (coef if coef.shape[0] == 1 else coef[row_layer]), part.solved[chunk].to(compute)
            out = torch.addmm(weights, y, solved) if out is None else out.addmm_(y, solved)  # W is never written
    out = weights.clone() if out is None else out
    return out if layerwise is None else add_layerwise(out, weights, layerwise, row_layer)


def apply_to_inputs(
    x: torch.Tensor, delta: torch.Tensor | None, correction: Correction | None = None, layer: int | None = None,
    layerwise: Layerwise | None = None,
) -> torch.Tensor:
    """``x T_ℓᵀ`` computed as ``x + x Δᵀ (+ correction)`` where ``Δ = T − I``: what a processor feeds
    ``to_k``/``to_v``.

    ``delta`` and the correction must already be on `x`'s device; the product runs in float32 or better and is
    returned in `x`'s dtype. `delta` may be `None` (``T = I``) when `layerwise` (``T_ℓ − I = Uᵀ D_ℓ``) carries the
    change.
    """
    compute = torch.promote_types(x.dtype, torch.float32)
    xc = x.to(compute)
    out = xc if delta is None else xc + xc @ delta.to(compute).T
    if layerwise is not None:
        out = out + layerwise_inputs(xc, layerwise, layer)
    if correction is not None:
        coef = correction.coef[layer].to(compute)
        out = out + ((xc @ correction.solved.to(compute).T) * coef) @ correction.tokens.to(compute)
    return out.to(x.dtype)


def grouped_grams(weights: list[torch.Tensor]) -> torch.Tensor:
    """``W_ℓᵀ W_ℓ`` for every layer, batched over layers of equal shape; float64, shape ``(L, d, d)``."""
    grams = [None] * len(weights)
    shapes: dict[tuple, list[int]] = {}
    for i, w in enumerate(weights):
        shapes.setdefault(tuple(w.shape), []).append(i)
    for indices in shapes.values():
        stack = torch.stack([weights[i] for i in indices]).to(torch.float64)
        for i, g in zip(indices, stack.transpose(1, 2) @ stack):
            grams[i] = g
    return torch.stack(grams)


def output_distances(
    grams: torch.Tensor, transform: torch.Tensor, correction: Correction | None, x: torch.Tensor, y: torch.Tensor,
    chunk_size: int = 256,
) -> torch.Tensor:
    """``Σ_ℓ ‖W_ℓ T_ℓ x_k − W_ℓ y_k‖²`` for each row ``k`` of `x`/`y`, summed over the layers of `grams`.

    With ``G_ℓ = W_ℓᵀ W_ℓ`` this is ``Σ_ℓ u_ℓᵀ G_ℓ u_ℓ`` with ``u_ℓ = T_ℓ x − y``: no layer output is materialised.
    ``transform = None`` stands for ``T = I`` (pass it with ``y = 0`` to get ``Σ_ℓ ‖W_ℓ x‖²``). With a shared
    transform (no correction), `grams` may instead be the stacked weights ``W_all`` (R×d): ``‖W_all u‖²`` is cheaper
    than forming the Gram when there are fewer than ``d/2`` tokens.
    """
    x, y = x.to(torch.float64), y.to(torch.float64)
    out = []
    direct = grams.dim() == 2
    if direct and correction is not None:
        raise ValueError("per-layer corrections need per-layer Gram matrices, not the stacked weights")
    summed = None if direct else grams.sum(0)
    for start in range(0, x.shape[0], chunk_size):
        xs, ys = x[start : start + chunk_size], y[start : start + chunk_size]
        u = (xs if transform is None else xs @ transform.T) - ys
        if direct:
            out.append(((u.to(grams.dtype) @ grams.T) ** 2).sum(-1).to(torch.float64))
            continue
        if correction is None:
            out.append(((u @ summed) * u).sum(-1))
            continue
        # u_ℓ = u + (a_ℓ ⊙ (D x)) C, per layer
        proj = xs @ correction.solved.T  # (k, r)
        u_layers = u[None] + (correction.coef[:, None, :] * proj[None]) @ correction.tokens  # (L, k, d)
        out.append((torch.einsum("lkd,lde->lke", u_layers, grams) * u_layers).sum((0, 2)))
    return torch.cat(out) if out else x.new_zeros(0)

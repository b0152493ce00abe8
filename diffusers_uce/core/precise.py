"""Precise erasure by null-space constrained editing (SPEED, Li et al., ICLR 2026), in pure torch and float64.

Tokens are rows: ``T``, ``A`` (m×d) the erased tokens and their position-aligned guide tokens over ``n`` concepts,
``R`` the retain tokens, ``K`` (k×d) the invariant tokens. With ``S_tt = TᵀT/n`` a layer's update is

    ΔW_ℓ = W_ℓ (A − T)ᵀ/n · D_ℓ,   D_ℓ = T P_ℓ (I − M_ℓ Kᵀ (K P_ℓ M_ℓ Kᵀ + μI)⁻¹ K P_ℓ) M_ℓ,   M_ℓ = (S_tt P_ℓ + αI)⁻¹,

where ``P_ℓ`` projects onto the eigenvectors of the retain covariance with eigenvalue below ``τ`` (the directions the
retain set does not use); ``μ = 0`` keeps the invariant tokens exactly (``W'K = WK``). ``D_ℓ`` depends on ``K`` only
through the span of ``P_ℓ Kᵀ`` (a token in the retained directions is kept anyway), so with ``μ = 0`` an orthonormal
basis of that span replaces ``K``: invariants inside the retained directions or repeating each other are fine.
The update is an exact rank-m LoRA.
Prior refinement (a filter of the retain tokens and copies ``r + s v_ℓ`` along the layer's weakest input direction)
makes ``P_ℓ`` per layer. No d×d matrix is formed per layer: the retain covariance has rank ≤ kept tokens + 1, so
``P_ℓ = I − B_ℓB_ℓᵀ`` with a thin ``B_ℓ``, and ``M_ℓ`` is the identity plus rank m (Woodbury): every solve is m×m.
Layers with a bias use the homogeneous form: weights ``[W | b]``, tokens ``[c; 1]``.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from ..utils.checks import all_finite
from .layerwise import layer_blocks

_DOUBLE = torch.float64


@dataclass
class SpeedUpdate:
    """The SPEED update of every edited layer as an exact LoRA: ``W'_ℓ = W_ℓ + (W_ℓ up_tokensᵀ) down[ℓ]``.

    Args:
        up_tokens (`torch.Tensor`): ``(A − T)/n``, shape ``(m, d)``; ``up_ℓ = W_ℓ up_tokensᵀ``.
        down (`torch.Tensor`): ``D_ℓ`` per layer, shape ``(num_layers, m, d)`` with prior refinement, ``(1, m, d)``
            (shared by every layer) without.
        null_dim (`torch.Tensor`): dimension of the null space the update lives in, per row of `down`.
        retain_kept (`torch.Tensor`, *optional*): which retain tokens each layer kept, ``(num_layers, num_retain)``.
        copies_kept (`torch.Tensor`, *optional*): which augmented copies each layer kept,
            ``(num_layers, num_retain, augment)``.
        scalars (`torch.Tensor`, *optional*): the drawn steps ``s`` of the copies ``r + s v_ℓ``, same shape.
    """

    up_tokens: torch.Tensor
    down: torch.Tensor
    null_dim: torch.Tensor
    retain_kept: torch.Tensor | None = None
    copies_kept: torch.Tensor | None = None
    scalars: torch.Tensor | None = None

    @property
    def num_retain_kept(self) -> torch.Tensor | None:  # retain tokens kept per layer (None without refinement)
        return None if self.retain_kept is None else self.retain_kept.sum(1)

    @property
    def num_copies_kept(self) -> torch.Tensor | None:  # augmented copies kept per layer (None without refinement)
        return None if self.copies_kept is None else self.copies_kept.sum((1, 2))

    def dense(self, layer: int = 0) -> torch.Tensor:
        """The d×d matrix ``X_ℓ`` with ``W'_ℓ = W_ℓ (I + X_ℓ)`` (for inspection and tests)."""
        return self.up_tokens.T @ self.down[layer if self.down.shape[0] > 1 else 0]


def _check_positive(name: str, value, zero_ok: bool = False, hint: str = ""):
    value = float(value)
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero_ok):
        bound = ">= 0" if zero_ok else "> 0"
        raise ValueError(f"{name} must be a finite number {bound} (got {value}){hint}")
    return value


def _layer_groups(row_layer: torch.Tensor, num_layers: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`layer_blocks`, after checking that every layer has rows."""
    counts = torch.bincount(row_layer, minlength=num_layers)
    if counts.numel() != num_layers or bool((counts == 0).any()):
        raise ValueError(f"row_layer must give every one of the {num_layers} layers at least one row (and no more "
                         f"layers); got rows per layer {counts.tolist()}")
    return layer_blocks(row_layer, num_layers)


def smallest_right_singular_vectors(weights, row_layer: torch.Tensor | None = None,
                                    num_layers: int | None = None) -> torch.Tensor:
    """The right singular vector ``v_ℓ`` of each layer's weights with the smallest singular value, in float64.

    It depends only on the weights: compute it once per model and pass it to `speed_update` as `singular`. Among the
    ``min(out_ℓ, d)`` singular values of the reduced SVD, the smallest is taken, so a layer with fewer outputs than
    inputs gets its weakest direction inside its row space (not an arbitrary vector of its exact null space). The sign
    is fixed (largest entry positive), so the result is reproducible. Layers of equal shape are solved in one batch.

    Args:
        weights (`list[torch.Tensor]` or `torch.Tensor`): a list of per-layer weights ``(out_ℓ, d)``, or the stacked
            weights ``W_all`` ``(R, d)`` together with `row_layer` and `num_layers`.
        row_layer (`torch.Tensor`, *optional*): layer index of each row of `W_all`, shape ``(R,)``.
        num_layers (`int`, *optional*): number of layers in `W_all`.

    Returns:
        `torch.Tensor`: unit vectors, shape ``(num_layers, d)``, float64.
    """
    if isinstance(weights, (list, tuple)):
        sizes = torch.tensor([w.shape[0] for w in weights], device=weights[0].device)
        num_layers, weights = len(sizes), torch.cat(list(weights))
        row_layer = torch.repeat_interleave(torch.arange(num_layers, device=weights.device), sizes)
    elif row_layer is None or num_layers is None:
        raise ValueError("pass row_layer and num_layers with the stacked weights (or a list of per-layer weights)")
    d = weights.shape[1]
    out = torch.zeros(num_layers, d, dtype=_DOUBLE, device=weights.device)
    for layers, index in _layer_groups(row_layer, num_layers):
        w = weights[index].to(_DOUBLE)  # (g, c, d)
        if index.shape[1] >= d:
            v = torch.linalg.eigh(w.mT @ w).eigenvectors[..., 0]
        else:  # the smallest eigenvector u of W Wᵀ gives v = Wᵀu / σ: an out×out problem instead of d×d
            v = (w.mT @ torch.linalg.eigh(w @ w.mT).eigenvectors[..., :1])[..., 0]
            norm = v.norm(dim=-1, keepdim=True)
            weak = norm[:, 0] <= 1e-12 * w.flatten(1).norm(dim=1)
            v = v / norm.clamp_min(torch.finfo(_DOUBLE).tiny)
            if bool(weak.any()):  # rank-deficient layer: any unit vector with singular value 0 will do
                v[weak] = torch.linalg.svd(w[weak], full_matrices=False).Vh[:, -1]
        sign = torch.sign(v.gather(1, v.abs().argmax(1, keepdim=True)))
        out[layers] = v * torch.where(sign == 0, 1.0, sign)
    return out


def augmentation_scalars(num_layers: int, num_retain: int, augment: int, seed: int = 0) -> torch.Tensor:
    """The steps ``s ~ N(0, 1)`` of the augmented copies, ``(num_layers, num_retain, augment)`` float64 on the CPU,
    drawn in one call from a `torch.Generator` seeded with `seed` (the same seed always gives the same steps)."""
    generator = torch.Generator().manual_seed(int(seed))
    return torch.randn(num_layers, num_retain, augment, generator=generator, dtype=_DOUBLE)


def augmented_copies(retain: torch.Tensor, singular: torch.Tensor, scalars: torch.Tensor) -> torch.Tensor:
    """The augmented copies ``r + s v_ℓ``, ``(num_layers, num_retain, augment, d)`` (the solve never forms them)."""
    retain, singular = retain.to(_DOUBLE), singular.to(_DOUBLE)
    return retain[None, :, None] + scalars.to(retain)[..., None] * singular[:, None, None]


def _used_basis(retain, threshold, weight, shift=None, shift2=None, direction=None):
    """Thin basis ``B`` (L, d, q) with ``P_ℓ = I − B_ℓB_ℓᵀ``, and the null-space dimension per layer.

    The covariance of layer ℓ is ``(1/N_ℓ) Σ_r [w_r r rᵀ + c1_r (r vᵀ + v rᵀ) + c2_r v vᵀ]`` with ``w_r`` the
    multiplicity of token r (itself plus its kept copies, 0 when dropped), ``c1_r = Σ s``, ``c2_r = Σ s²`` over its
    kept copies. It lives in the span of the retain tokens and ``v_ℓ``: an orthonormal basis Q of that span (one QR of
    the tokens shared by every layer, plus the part of ``v_ℓ`` outside it) reduces the eigenproblem to ``Qᵀ Σ Q``;
    basis columns no kept token uses get eigenvalue 0 and so land in the null space.
    """
    num_layers, (num_retain, d) = weight.shape[0], retain.shape
    if num_retain + (direction is not None) < d:  # one QR of every retain token, then each layer's v_ℓ residual
        shared = torch.linalg.qr(retain.T).Q  # (d, |R|)
        basis = shared.expand(num_layers, d, num_retain)
        if direction is not None:
            residual = direction - (direction @ shared) @ shared.T
            residual = residual - (residual @ shared) @ shared.T  # twice is enough (Gram–Schmidt)
            norm = residual.norm(dim=1, keepdim=True)
            residual = torch.where(norm > 1e-12, residual / norm.clamp_min(1e-300), 0.0)
            basis = torch.cat([basis, residual[..., None]], 2)  # (L, d, q)
    else:
        basis = torch.eye(d, dtype=_DOUBLE, device=retain.device).expand(num_layers, d, d)
    coords = retain @ basis  # (L, |R|, q)
    cov = (coords * weight[..., None]).mT @ coords
    if direction is not None:
        v = direction[:, None] @ basis  # (L, 1, q)
        cross = shift[:, None] @ coords  # (L, 1, q)
        cov = cov + cross.mT @ v + v.mT @ cross + shift2.sum(1)[:, None, None] * (v.mT @ v)
    values, vectors = torch.linalg.eigh(cov / weight.sum(1)[:, None, None])
    used = values >= threshold
    return basis @ (vectors * used[:, None, :]), d - used.sum(1)


def retain_directions(retain: torch.Tensor, threshold: float = 0.1) -> torch.Tensor:
    """Orthonormal basis ``B`` (d×q) of the directions the retain set uses: the eigenvectors of ``Σ_R = RᵀR/|R|``
    with eigenvalue ``>= threshold``. The null-space projector of the edit is ``P = I − B Bᵀ``."""
    retain = retain.to(_DOUBLE)
    basis, _ = _used_basis(retain, threshold, torch.ones(1, retain.shape[0], dtype=_DOUBLE, device=retain.device))
    return basis[0][:, basis[0].norm(dim=0) > 0]


def kmeans(points: torch.Tensor, num_centres: int, seed: int = 0, iterations: int = 100) -> torch.Tensor:
    """Deterministic k-means in float64: k-means++ initialisation from a seeded generator, then Lloyd iterations
    (at most `iterations`, stopping when the centres no longer move; an empty cluster keeps its centre).

    Returns:
        `torch.Tensor`: the centres, ``(num_centres, d)`` float64, in the order of their initialisation.
    """
    x = points.to(_DOUBLE)
    if not 0 < num_centres <= x.shape[0]:
        raise ValueError(f"num_centres must be between 1 and the number of points ({x.shape[0]}); got {num_centres}")
    generator = torch.Generator().manual_seed(int(seed))
    chosen = [int(torch.randint(x.shape[0], (1,), generator=generator))]
    dist2 = ((x - x[chosen[0]]) ** 2).sum(1)
    for _ in range(1, num_centres):
        total = float(dist2.sum())
        weights = (dist2 / total).cpu() if total > 0 else torch.ones(x.shape[0], dtype=_DOUBLE)
        chosen.append(int(torch.multinomial(weights, 1, generator=generator)))
        dist2 = torch.minimum(dist2, ((x - x[chosen[-1]]) ** 2).sum(1))
    centres = x[chosen]
    for _ in range(iterations):
        assign = ((x[:, None] - centres[None]) ** 2).sum(-1).argmin(1)
        counts = torch.bincount(assign, minlength=num_centres)[:, None]
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        new = torch.where(counts > 0, sums / counts.clamp_min(1), centres)
        if torch.equal(new, centres):
            break
        centres = new
    return centres


def default_invariants(states: torch.Tensor, num_centres: int = 3, seed: int = 0) -> torch.Tensor:
    """The authors' invariant tokens: the start token of the empty prompt and `num_centres` k-means centres of its
    other states (positions 1–76 of ``""``).

    Args:
        states (`torch.Tensor`): text-encoder states of the empty prompt, ``(77, d)`` (or ``(1, 77, d)``).
        num_centres (`int`, defaults to 3): number of k-means centres (0 keeps only the start token).
        seed (`int`, defaults to 0): seed of the k-means initialisation.

    Returns:
        `torch.Tensor`: ``(1 + num_centres, d)`` float64, the start token first.
    """
    states = states.reshape(-1, states.shape[-1]).to(_DOUBLE)
    if num_centres == 0:
        return states[:1].clone()
    return torch.cat([states[:1], kmeans(states[1:], num_centres, seed=seed)])


def _filter_terms(weights, row_layer, num_layers, erase, up_tokens, num_concepts, retain, singular, chunk_size):
    """``‖E_ℓ r‖²``, ``⟨E_ℓ r, E_ℓ v_ℓ⟩`` (L, |R|) and ``‖E_ℓ v_ℓ‖²`` (L,) with ``E_ℓ = W_ℓ(S_at − S_tt)(I + S_tt)⁻¹``.

    ``T (I + S_tt)⁻¹ = (I + TTᵀ/n)⁻¹ T`` (an m×m solve), so ``E_ℓ x = (W_ℓ up_tokensᵀ) F x``: one pass over the rows
    of ``W_all`` (in float64 chunks), then per-layer sums.
    """
    m = erase.shape[0]
    gram = torch.eye(m, dtype=_DOUBLE, device=erase.device) + erase @ erase.T / num_concepts
    probe = torch.cholesky_solve(erase, torch.linalg.cholesky(gram)) @ torch.cat([retain, singular]).T
    num_retain = retain.shape[0]
    er2 = torch.zeros(num_layers, num_retain, dtype=_DOUBLE, device=erase.device)
    cross, ev2 = torch.zeros_like(er2), torch.zeros(num_layers, dtype=_DOUBLE, device=erase.device)
    for start in range(0, weights.shape[0], chunk_size):
        layer = row_layer[start : start + chunk_size]
        z = (weights[start : start + chunk_size].to(_DOUBLE) @ up_tokens.T) @ probe
        er, ev = z[:, :num_retain], z[:, num_retain:].gather(1, layer[:, None])
        er2.index_add_(0, layer, er * er)
        cross.index_add_(0, layer, er * ev)
        ev2.index_add_(0, layer, ev[:, 0] ** 2)
    return er2, cross, ev2


def _down(erase, num_concepts, basis, invariants, alpha, mu):
    """``D_ℓ`` for every layer from ``P_ℓ = I − B_ℓB_ℓᵀ``: with ``C = αI + T P Tᵀ/n``, ``T P M = C⁻¹ T P`` and
    ``Y M = (Y − (Y Tᵀ/n) C⁻¹ T P)/α`` (Woodbury); the only solves are m×m and k×k."""
    m = erase.shape[0]
    tp = erase - (erase @ basis) @ basis.mT  # (L, m, d)
    core = alpha * torch.eye(m, dtype=_DOUBLE, device=erase.device) + tp @ erase.T / num_concepts
    factor, info = torch.linalg.cholesky_ex(core)
    if bool((info != 0).any()):
        raise ValueError("the SPEED system is not positive definite; check that the tokens are finite")
    tpm = torch.cholesky_solve(tp, factor)  # T P M
    if invariants.shape[0] == 0:
        return tpm
    kp = invariants - (invariants @ basis) @ basis.mT  # K P
    shift = mu * torch.eye(invariants.shape[0], dtype=_DOUBLE, device=erase.device)
    if mu == 0:  # D depends on K only through span(P K): keep it exactly via an orthonormal basis of that span
        _, values, kp = torch.linalg.svd(kp, full_matrices=False)
        unused = values <= 1e-9 * float(invariants.norm(dim=1).max())  # inside the retained directions: kept anyway
        kp, invariants = kp * ~unused[..., None], kp * ~unused[..., None]
        shift = torch.diag_embed(unused.to(_DOUBLE))  # a zero row of K solves to zero
    kpm = (kp - (kp @ erase.T / num_concepts) @ tpm) / alpha  # K P M
    lhs = kpm @ invariants.mT + shift
    solved, info = torch.linalg.solve_ex(lhs, kpm)
    if bool((info != 0).any()) or not all_finite(solved):
        raise ValueError("the invariant tokens cannot be kept: the system is singular; use invariant_lamb > 0 or "
                         "fewer invariant tokens")
    return tpm - (tpm @ invariants.mT) @ solved


def speed_update(
    erase: torch.Tensor, guide: torch.Tensor, num_concepts: int, retain: torch.Tensor,
    invariants: torch.Tensor | None = None, *, threshold: float = 0.1, retain_scale: float = 1.0,
    invariant_lamb: float = 0.0, augment: int = 10, filter: bool = True, seed: int = 0,
    weights: torch.Tensor | None = None, row_layer: torch.Tensor | None = None, num_layers: int | None = None,
    singular: torch.Tensor | None = None, chunk_size: int = 8192,
) -> SpeedUpdate:
    """Solve the SPEED edit of every layer at once, in float64.

    Args:
        erase (`torch.Tensor`): erased tokens ``T``, stacked over the erased concepts, ``(m, d)``.
        guide (`torch.Tensor`): guide tokens ``A``, aligned row by row with `erase`, ``(m, d)``.
        num_concepts (`int`): number of erased concepts ``n`` (the averages are over concepts, not tokens).
        retain (`torch.Tensor`): retain tokens ``R``, ``(|R|, d)``; the edit avoids the directions they use.
        invariants (`torch.Tensor`, *optional*): tokens to keep unchanged, ``(k, d)`` (see `default_invariants`).
        threshold (`float`, defaults to 0.1): directions of the retain covariance with an eigenvalue below it are free
            to change; the others are protected.
        retain_scale (`float`, defaults to 1.0): the regulariser ``α`` (0.05 suits 10–100 celebrities).
        invariant_lamb (`float`, defaults to 0.0): ``μ``; 0 keeps the invariant tokens exactly, larger values relax it.
        augment (`int`, defaults to 10): augmented copies per retain token; 0 turns prior refinement (filter and
            augmentation) off, and one update is shared by every layer.
        filter (`bool`, defaults to `True`): with augmentation, keep per layer only the retain tokens whose
            ``‖E_ℓ r‖`` is above its mean (the ones the erasure would disturb most); `False` keeps them all.
        seed (`int`, defaults to 0): seed of the augmentation (same seed, same result).
        weights (`torch.Tensor`, *optional*): ``W_all`` ``(R, d)``, the layers' weights stacked along rows; needed
            with augmentation, together with `row_layer` ``(R,)`` and `num_layers`.
        singular (`torch.Tensor`, *optional*): `smallest_right_singular_vectors` of the weights, ``(num_layers, d)``
            (computed when not given; cache it across edits of the same model).
        chunk_size (`int`, defaults to 8192): rows of `weights` converted to float64 at a time.

    Returns:
        `SpeedUpdate`: the update as LoRA factors, with what the refinement kept.
    """
    threshold = _check_positive("threshold", threshold, hint="; directions of the retain covariance with an "
                                "eigenvalue below it are edited (0.1 by default)")
    alpha = _check_positive("retain_scale", retain_scale, hint="; use 1.0, or 0.05 for 10-100 celebrities")
    mu = _check_positive("invariant_lamb", invariant_lamb, zero_ok=True, hint="; 0 keeps the invariant tokens exactly")
    if isinstance(augment, bool) or not isinstance(augment, numbers.Integral) or augment < 0:
        raise ValueError(f"augment must be a non-negative integer (got {augment!r}): the number of augmented copies "
                         f"per retain token, 0 to turn prior refinement off")
    if isinstance(num_concepts, bool) or not isinstance(num_concepts, numbers.Integral) or num_concepts <= 0:
        raise ValueError(f"num_concepts must be a positive integer (got {num_concepts!r})")
    if erase.dim() != 2 or erase.shape != guide.shape or erase.shape[0] == 0:
        raise ValueError(f"erase and guide must be non-empty (m, d) tensors of the same shape; got "
                         f"{tuple(erase.shape)} and {tuple(guide.shape)}")
    d = erase.shape[1]
    if retain.dim() != 2 or retain.shape[1] != d or retain.shape[0] == 0:
        raise ValueError(f"retain must be a non-empty (|R|, {d}) tensor of retain tokens (got {tuple(retain.shape)}); "
                         f"add retain prompts, e.g. the empty prompt")
    if invariants is not None and (invariants.dim() != 2 or invariants.shape[1] != d):
        raise ValueError(f"invariants must be a (k, {d}) tensor like the other tokens (got {tuple(invariants.shape)})")
    device = erase.device if weights is None else weights.device
    erase, guide, retain = (x.to(device, _DOUBLE) for x in (erase, guide, retain))
    invariants = (torch.zeros(0, d, dtype=_DOUBLE, device=device) if invariants is None
                  else invariants.to(device, _DOUBLE))
    if not all_finite(erase, guide, retain, invariants):
        raise ValueError("the erase, guide, retain and invariant tokens must be finite")
    up_tokens = (guide - erase) / num_concepts
    extra = {}
    if augment == 0:
        basis, null_dim = _used_basis(retain, threshold, torch.ones(1, retain.shape[0], dtype=_DOUBLE, device=device))
    else:
        if weights is None or row_layer is None or num_layers is None or weights.dim() != 2 or weights.shape[1] != d:
            raise ValueError(f"augmentation (augment > 0) needs weights (R, {d}), row_layer and num_layers; pass them "
                             f"or set augment=0")
        if row_layer.shape != weights.shape[:1] or not 0 <= int(row_layer.min()) <= int(row_layer.max()) < num_layers:
            raise ValueError(f"row_layer must give a layer index in [0, {num_layers}) for each of the "
                             f"{weights.shape[0]} rows of weights")
        if singular is None:
            singular = smallest_right_singular_vectors(weights, row_layer, num_layers)
        if singular.shape != (num_layers, d):
            raise ValueError(f"singular must have shape ({num_layers}, {d}), got {tuple(singular.shape)}")
        singular = singular.to(device, _DOUBLE)
        er2, cross, ev2 = _filter_terms(weights, row_layer.to(device), num_layers, erase, up_tokens, num_concepts,
                                        retain, singular, chunk_size)
        if not all_finite(er2, ev2):
            raise ValueError("the weights give non-finite outputs; nothing was computed: check the model's weights")
        kept = torch.ones_like(er2, dtype=torch.bool)
        if filter:
            norms = er2.sqrt()
            kept = norms > norms.mean(1, keepdim=True)
            kept |= ~kept.any(1, keepdim=True)  # all norms equal (e.g. no change at all): keep every token
        scalars = augmentation_scalars(num_layers, retain.shape[0], augment, seed).to(device)
        norms = (er2[..., None] + 2 * scalars * cross[..., None] + scalars**2 * ev2[:, None, None]).clamp_min(0).sqrt()
        copies = (norms > norms.mean(-1, keepdim=True)) & kept[..., None]
        kept_steps = scalars * copies
        basis, null_dim = _used_basis(retain, threshold, kept + copies.sum(-1).to(_DOUBLE), kept_steps.sum(-1),
                                      (kept_steps * scalars).sum(-1), singular)
        extra = {"retain_kept": kept, "copies_kept": copies, "scalars": scalars}
    if bool((null_dim == 0).any()):
        layers = (null_dim == 0).nonzero().squeeze(1).tolist()
        raise ValueError(f"the retain covariance uses every direction at threshold={threshold} (its null space is "
                         f"empty{'' if augment == 0 else f' for layers {layers}'}), so nothing could be edited; "
                         f"use a larger threshold or fewer retain tokens")
    down = _down(erase, num_concepts, basis, invariants, alpha, mu)
    return SpeedUpdate(up_tokens=up_tokens, down=down, null_dim=null_dim, **extra)


def apply_update(
    weights: torch.Tensor, row_layer: torch.Tensor, update: SpeedUpdate, scale: float = 1.0
) -> torch.Tensor:
    """``W_ℓ + scale · (W_ℓ up_tokensᵀ) down[ℓ]`` for every layer at once (layers with as many rows are one batched
    product). Computed in float32 or better and returned in the dtype of `weights`, which are left untouched."""
    compute = torch.promote_types(weights.dtype, torch.float32)
    w = weights.to(compute)
    y = (w @ update.up_tokens.to(w).T) * scale  # (R, m)
    down = update.down.to(w)
    if down.shape[0] == 1:
        return torch.addmm(w, y, down[0]).to(weights.dtype)
    out = w.clone()
    for layers, index in _layer_groups(row_layer.to(w.device), down.shape[0]):
        out.index_put_((index,), y[index] @ down[layers], accumulate=True)
    return out.to(weights.dtype)

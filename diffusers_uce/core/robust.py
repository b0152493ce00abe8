"""Hardening an edit against adversarial text embeddings (RECE, Gong et al., ECCV 2024), in closed form.

After an edit ``W'_ℓ = W_ℓ T`` an attacker who controls the text embedding looks for the input ``c'`` that makes
the edited layers reproduce what the original layers gave an erased token ``c``:

    c' = argmin_x Σ_ℓ ‖W_ℓ T x − W_ℓ c‖² + ρ‖x‖² = (ρI + TᵀGT)⁻¹ TᵀG c,    G = Σ_ℓ W_ℓᵀ W_ℓ.

A hardening round makes a further UCE edit from the current weights that maps every ``c'`` to its guide ``c*``:
``T ← T S``. Everything goes through the one Gram matrix ``G`` of all edited layers, so the cost does not depend
on the number of layers. Tokens are rows. A layer with a bias is handled in homogeneous form: weights ``[W | b]``,
tokens ``[c, 1]`` and transforms ``[[T, 0], [uᵀ, 1]]`` (pass ``biased=True``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..utils.checks import all_finite, is_whole_number
from .solve import EditTerms, bias_direction, solve_transform, with_bias

_F64 = torch.float64


@dataclass
class HardeningResult:
    """Outcome of `harden`.

    Args:
        transform (`torch.Tensor`): the hardened transform ``T S_1 ⋯ S_k`` (float64), to use in place of ``T``.
        steps (`list[torch.Tensor]`): the further edit ``S_r`` of each round.
        recovery (`torch.Tensor`): adversarial recovery of each concept, shape ``(rounds + 1, num_concepts)``; row 0
            is before hardening, row ``r`` after round ``r``. 1 means an attacker recovers the concept exactly, 0
            that only the guide comes back.
        norm_ratio (`torch.Tensor`): ``‖C'‖_F / ‖C‖_F`` of each concept, same shape: how far out of distribution
            the attacker has to go.
    """

    transform: torch.Tensor
    steps: list[torch.Tensor]
    recovery: torch.Tensor
    norm_ratio: torch.Tensor


def _positive(name: str, value, allow_zero: bool = False) -> None:
    values = torch.as_tensor(value, dtype=_F64)
    allowed = (values >= 0) if allow_zero else values > 0
    if isinstance(value, bool) or not bool((torch.isfinite(values) & allowed).all()):
        raise ValueError(f"{name} must be finite and {'>= 0' if allow_zero else '> 0'} (got {value})")


def _finite(**tensors: torch.Tensor) -> None:
    for name, tensor in tensors.items():
        if not all_finite(tensor):
            raise ValueError(f"{name} has non-finite entries (inf or nan); nothing was changed")


def _tokens(name: str, tokens: torch.Tensor, width: int, biased: bool) -> torch.Tensor:
    tokens = tokens.to(_F64)
    if biased and tokens.shape[-1] == width - 1:
        tokens = torch.nn.functional.pad(tokens, (0, 1), value=1.0)
    if tokens.dim() != 2 or tokens.shape[-1] != width:
        raise ValueError(f"{name} must have shape (n, {width}) to match the Gram matrix (got {tuple(tokens.shape)})")
    if biased and not bool((tokens[:, -1] == 1).all()):
        raise ValueError(f"{name}: with biased=True the last column of the tokens must be 1")
    return tokens


def stacked_gram(weights: torch.Tensor | Sequence[torch.Tensor], chunk_size: int = 4096,
                 compute_dtype: torch.dtype = _F64) -> torch.Tensor:
    """``G = W_allᵀ W_all``: the Gram matrix of the weights of all edited layers stacked along rows.

    Args:
        weights (`torch.Tensor` or list of `torch.Tensor`): the stacked weights ``W_all`` (R×d), or the weights of
            each layer (each out_ℓ×d). For layers with a bias pass ``[W | b]`` (d+1 columns).
        chunk_size (`int`, *optional*, defaults to 4096): rows upcast to float64 at a time, bounding the memory.
        compute_dtype (`torch.dtype`, *optional*, defaults to `torch.float64`): dtype of each chunk's product (the
            sum is always float64); `torch.float32` is several times faster on a CPU, with ~1e-7 relative error.

    Returns:
        `torch.Tensor`: ``G`` (d×d), float64, on the device of the weights.
    """
    parts = [weights] if isinstance(weights, torch.Tensor) else list(weights)
    gram = torch.zeros(parts[0].shape[-1], parts[0].shape[-1], dtype=_F64, device=parts[0].device)
    for part in parts:
        for start in range(0, part.shape[0], chunk_size):
            rows = part[start : start + chunk_size].to(compute_dtype)
            gram += (rows.T @ rows).to(_F64)
    _finite(weights=gram)
    return gram


def adversarial_embeddings(
    gram: torch.Tensor, transform: torch.Tensor, tokens: torch.Tensor, reg: float, biased: bool = False
) -> torch.Tensor:
    """The attacker's embedding ``c'`` of every token: ``argmin_x Σ_ℓ ‖W_ℓ T x − W_ℓ c‖² + ρ‖x‖²``.

    That is ``c' = (ρI + TᵀGT)⁻¹ TᵀG c``, one Cholesky solve for all tokens. With ``biased=True`` the last
    coordinate of ``x`` is the constant 1 (the attacker controls the embedding, not the bias), ``ρ`` applies to the
    other coordinates only, and with ``M = TᵀGT``: ``x = (ρI + M_xx)⁻¹ ((TᵀG c)_x − M_x1)``.

    Args:
        gram (`torch.Tensor`): ``G`` from `stacked_gram`.
        transform (`torch.Tensor`): the current shared transform ``T`` (homogeneous when `biased`).
        tokens (`torch.Tensor`): the tokens ``c`` to recover, as rows (n×d; with `biased`, ``[c, 1]`` or ``c``).
        reg (`float`): the attacker's regulariser ``ρ`` (> 0); smaller values let the attacker go further.
        biased (`bool`, *optional*, defaults to `False`): whether `gram` and `transform` are in homogeneous form.

    Returns:
        `torch.Tensor`: ``c'`` as rows, float64, shape (n, width of `gram`) (last column 1 when `biased`).
    """
    _positive("reg", reg)
    gram, transform = gram.to(_F64), transform.to(gram.device, _F64)
    tokens = _tokens("tokens", tokens.to(gram.device), gram.shape[0], biased)
    if transform.shape != gram.shape:
        raise ValueError(f"transform must be {tuple(gram.shape)} like the Gram matrix, got {tuple(transform.shape)}")
    _finite(gram=gram, transform=transform, tokens=tokens)
    return _attack(gram, transform, tokens, reg, biased)


def attack_system(gram, transform, reg: float, biased: bool):
    """The attacker's system on checked float64 inputs: the Cholesky factor of ``ρI + M_kk`` (``M = TᵀGT``, ``k``
    the coordinates the attacker controls: all but the constant one with a bias), ``M`` and ``G T``."""
    gt = gram @ transform
    m, k = transform.T @ gt, gram.shape[0] - biased
    system = m[:k, :k].clone()
    system.diagonal().add_(reg)
    factor, info = torch.linalg.cholesky_ex(system)
    if int(info) != 0:
        raise ValueError("the attacker's system is not positive definite (non-finite or overflowing values); "
                         "nothing was changed: check the weights and use a larger reg")
    return factor, m, gt


def _attack(gram, transform, tokens, reg, biased, terms: bool = False):
    """`adversarial_embeddings` on checked float64 inputs (homogeneous tokens when `biased`).

    With `terms`, also returns ``‖W T c' − W c‖² − ‖W c‖²`` per token without any further d×d product: with
    ``(ρI + M) x = r`` the attack's own system, it is ``−xᵀr − ρ‖x‖²`` (plus ``M_11 − 2 (TᵀGc)_1`` with a bias).
    """
    factor, m, gt = attack_system(gram, transform, reg, biased)
    rhs, k = gt.T @ tokens.T, gram.shape[0] - biased  # TᵀG c, one column per token
    full = rhs
    if biased:
        rhs = rhs[:k] - m[:k, k:]
    out = torch.cholesky_solve(rhs, factor).T
    if terms:
        moved = -(out * rhs.T).sum(-1) - reg * (out * out).sum(-1) + ((m[k, k] - 2 * full[k]) if biased else 0.0)
    out = torch.nn.functional.pad(out, (0, 1), value=1.0) if biased else out
    return (out, moved) if terms else out


def adversarial_recovery(
    gram: torch.Tensor, transform: torch.Tensor, tokens: torch.Tensor, guides: torch.Tensor,
    adversarial: torch.Tensor, group_index: torch.Tensor | None = None, biased: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """How much of each erased concept an attacker gets back, measured on the layer outputs (no images).

    For each concept (the tokens with the same `group_index`), over its tokens and all edited layers stacked:
    recovery ``1 − ‖W T C' − W C‖ / ‖W C − W C*‖`` (1: the attacker recovers the concept exactly, 0: only the guide
    comes back; it can be negative when the attacker lands further away than the guide) and the norm ratio
    ``‖C'‖_F / ‖C‖_F`` (the constant coordinate excluded when `biased`). A concept whose tokens give the same outputs
    as its guide's (or have zero norm, or that has no tokens) gets 0 for the undefined quantity.

    Args:
        gram (`torch.Tensor`): ``G`` from `stacked_gram`.
        transform (`torch.Tensor`): the shared transform ``T`` the attack was made against.
        tokens (`torch.Tensor`): the erased tokens ``C`` as rows.
        guides (`torch.Tensor`): their guide tokens ``C*``, row by row.
        adversarial (`torch.Tensor`): ``C'`` from `adversarial_embeddings`.
        group_index (`torch.Tensor`, *optional*): the concept of each token, ``(n,)`` long in ``[0, num_concepts)``;
            by default every token is its own concept.
        biased (`bool`, *optional*, defaults to `False`): whether everything is in homogeneous form.

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: recovery and norm ratio, each ``(num_concepts,)`` float64.
    """
    gram, transform = gram.to(_F64), transform.to(gram.device, _F64)
    tokens, guides, adversarial = (_tokens(name, t.to(gram.device), gram.shape[0], biased) for name, t in
                                   (("tokens", tokens), ("guides", guides), ("adversarial", adversarial)))
    if group_index is None:
        group_index = torch.arange(tokens.shape[0], device=gram.device)
    group_index = group_index.to(gram.device, torch.long)
    if group_index.shape != tokens.shape[:1] or bool((group_index < 0).any()):
        raise ValueError(f"group_index must hold one non-negative concept index per token ({tokens.shape[0]})")
    num = int(group_index.max()) + 1 if group_index.numel() else 0

    def per_concept(rows: torch.Tensor, metric: torch.Tensor | None = None) -> torch.Tensor:  # Σ rowᵀ G row
        squares = ((rows if metric is None else rows @ metric) * rows).sum(-1)
        return torch.zeros(num, dtype=_F64, device=gram.device).index_add_(0, group_index, squares)

    def ratio(top: torch.Tensor, bottom: torch.Tensor) -> torch.Tensor:
        return torch.where(bottom > 0, top.sqrt() / bottom.clamp_min(torch.finfo(_F64).tiny).sqrt(), 0.0)

    recovered = per_concept(adversarial @ transform.T - tokens, gram)  # Σ ‖W T c' − W c‖²
    erased = per_concept(tokens - guides, gram)  # Σ ‖W c − W c*‖²
    recovery = torch.where(erased > 0, 1 - ratio(recovered, erased), 0.0)
    k = gram.shape[0] - biased
    return recovery, ratio(per_concept(adversarial[:, :k]), per_concept(tokens[:, :k]))


def _edit_inputs(gram, erase, guide, preserve, biased, lamb, erase_scale, preserve_scale):
    """Validate the options and tokens of a further edit; returns the guide and preserved tokens in float64."""
    _positive("lamb", lamb)
    _positive("erase_scale", erase_scale, allow_zero=True)
    _positive("preserve_scale", preserve_scale)
    width = gram.shape[0]
    guide, preserve = (_tokens(name, t.to(gram.device), width, biased) for name, t in (("guide", guide),
                                                                                       ("preserve", preserve)))
    _finite(guide=guide, preserve=preserve)
    n, m = erase.shape[0], preserve.shape[0]
    if guide.shape[0] != n:
        raise ValueError(f"guide must have one row per erased token ({n}), got {guide.shape[0]}")
    for name, scale, rows in (("erase_scale", erase_scale, n), ("preserve_scale", preserve_scale, m)):
        if torch.as_tensor(scale).numel() not in (1, rows):
            raise ValueError(f"{name} must be one value or one per row ({rows}), got {torch.as_tensor(scale).numel()}")
    return guide, preserve


def _further_edit(adversarial, guide, preserve, lamb, erase_scale, preserve_scale, biased) -> torch.Tensor:
    k, n, m, device = adversarial.shape[1] - biased, adversarial.shape[0], preserve.shape[0], adversarial.device
    terms = EditTerms(
        erase=adversarial[:, :k], guide=guide[:, :k], preserve=preserve[:, :k], lamb=float(lamb),
        erase_weight=torch.as_tensor(erase_scale, dtype=_F64, device=device).reshape(-1).expand(n),
        preserve_weight=torch.as_tensor(preserve_scale, dtype=_F64, device=device).reshape(-1).expand(m),
        tensor_pair=torch.full((n,), -1, dtype=torch.long, device=device),
    )
    step, factor = solve_transform(terms)
    return with_bias(step, None, bias_direction(terms, factor))[0] if biased else step


def hardening_round(
    gram: torch.Tensor, transform: torch.Tensor, erase: torch.Tensor, guide: torch.Tensor, preserve: torch.Tensor,
    *, reg: float, lamb: float = 0.1, erase_scale: float | torch.Tensor = 1.0,
    preserve_scale: float | torch.Tensor = 0.1, biased: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One hardening round: find ``c'`` for every erased token, then edit the current weights to map it to the guide.

    The further edit is UCE from the current weights ``W T``, erasing ``c'`` into ``c*`` and preserving ``p``:
    ``S = (λI + s_e Σ c* c'ᵀ + s_p Σ p pᵀ)(λI + s_e Σ c' c'ᵀ + s_p Σ p pᵀ)⁻¹`` (with a bias, its homogeneous form,
    the bias kept as in the edit itself). The hardened transform is ``T @ S``.

    Args:
        gram (`torch.Tensor`): ``G`` from `stacked_gram`.
        transform (`torch.Tensor`): the current shared transform ``T``.
        erase (`torch.Tensor`): the erased tokens ``c`` as rows.
        guide (`torch.Tensor`): their guide tokens ``c*``, row by row.
        preserve (`torch.Tensor`): preserved tokens ``p`` as rows (may be empty).
        reg (`float`): the attacker's regulariser ``ρ`` (> 0).
        lamb (`float`, *optional*, defaults to 0.1): the regulariser ``λ`` of the further edit (> 0).
        erase_scale (`float` or `torch.Tensor`, *optional*, defaults to 1.0): ``s_e``, one value or one per token.
        preserve_scale (`float` or `torch.Tensor`, *optional*, defaults to 0.1): ``s_p`` (> 0), one value or one
            per preserved token.
        biased (`bool`, *optional*, defaults to `False`): whether `gram` and `transform` are in homogeneous form.

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: the further edit ``S`` and the adversarial tokens ``c'`` (float64).
    """
    guide, preserve = _edit_inputs(gram, erase, guide, preserve, biased, lamb, erase_scale, preserve_scale)
    adversarial = adversarial_embeddings(gram, transform, erase, reg, biased)
    return _further_edit(adversarial, guide, preserve, lamb, erase_scale, preserve_scale, biased), adversarial


def harden(
    gram: torch.Tensor, transform: torch.Tensor, erase: torch.Tensor, guide: torch.Tensor, preserve: torch.Tensor,
    rounds: int, *, reg: float, lamb: float = 0.1, erase_scale: float | torch.Tensor = 1.0,
    preserve_scale: float | torch.Tensor = 0.1, biased: bool = False, group_index: torch.Tensor | None = None,
) -> HardeningResult:
    """Run `rounds` hardening rounds and measure the adversarial recovery of every concept before and after each.

    The attack and the recovery use the same ``ρ`` (`reg`). Arguments are those of `hardening_round`, plus:

    Args:
        rounds (`int`): number of rounds (0 only measures the edit).
        group_index (`torch.Tensor`, *optional*): the concept of each erased token, ``(n,)`` long; by default every
            token is its own concept.

    Returns:
        `HardeningResult`: the hardened transform, each round's ``S`` and the per-round recovery and norm ratios.

    Raises:
        `ValueError`: on invalid options, non-finite inputs, or a round that produces non-finite values.
    """
    if not is_whole_number(rounds):
        raise ValueError(f"rounds must be a non-negative integer (got {rounds!r})")
    guide, preserve = _edit_inputs(gram, erase, guide, preserve, biased, lamb, erase_scale, preserve_scale)
    current = transform.to(gram.device, _F64)
    steps, recovery, norm_ratio = [], [], []
    adversarial = adversarial_embeddings(gram, current, erase, reg, biased)
    for r in range(rounds + 1):
        rec, ratio = adversarial_recovery(gram, current, erase, guide, adversarial, group_index, biased)
        recovery.append(rec)
        norm_ratio.append(ratio)
        if r == rounds:
            break
        step = _further_edit(adversarial, guide, preserve, lamb, erase_scale, preserve_scale, biased)
        current = current @ step
        finite = all_finite(current)
        adversarial = adversarial_embeddings(gram, current, erase, reg, biased) if finite else current
        if not (finite and all_finite(adversarial)):
            raise ValueError(f"hardening round {r + 1} produced non-finite values; nothing was changed: "
                             "use a larger reg or lamb, or fewer rounds")
        steps.append(step)
    return HardeningResult(current, steps, torch.stack(recovery), torch.stack(norm_ratio))


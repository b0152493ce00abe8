"""From edit records and encoded prompts to one joint solve over every target layer."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..utils.checks import all_finite
from .edits import ConceptEdit
from .layerwise import Layerwise
from .prompts import EncodedPrompts
from .solve import (
    Correction,
    EditTerms,
    bias_direction,
    combine,
    debias_correction,
    homogeneous,
    low_rank_delta,
    solve_transform,
    tensor_correction,
    with_bias,
)
from .wide import WoodburyInverse, as_layerwise


@dataclass
class AssembledTerms:
    """Solve inputs plus the bookkeeping the report needs.

    Args:
        terms (`EditTerms`): the tokens and weights of the joint solve.
        pairs (`list[tuple[str, str]]`): (erased concept, guide) of every pair, over all records.
        token_pair (`torch.Tensor`): pair index of every erased token.
        preserved (`list[str]`): preserved prompts (deduplicated across records).
        token_preserved (`torch.Tensor`): index into `preserved` of every preserved token.
        debias (`tuple`, *optional*): debiasing inputs of `solve.debias_correction`: attribute tokens, the row of
            each one's concept among the debiased concept tokens (which end `terms.erase`), and ``s_e · w_a``.
    """

    terms: EditTerms
    pairs: list[tuple[str, str]]
    token_pair: torch.Tensor
    preserved: list[str]
    token_preserved: torch.Tensor
    debias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    debiased_concepts: tuple[str, ...] = ()
    invariants: torch.Tensor | None = None  # precise erasure: tokens kept exactly
    retain_dropped: tuple[str, ...] = ()  # precise erasure: retain prompts dropped for naming an erased concept


def prompts_of(records: list[ConceptEdit]) -> list[str]:
    return [p for r in records for p in r.prompts()]


def assemble_terms(records: list[ConceptEdit], encoded: EncodedPrompts) -> AssembledTerms:
    """Select the tokens of every record (its token mode) and stack them into one `EditTerms`."""
    states = encoded.states
    device = states.device
    erase, guide, weight, tensor_pair, token_pair, pairs = [], [], [], [], [], []
    preserve_keys: dict[tuple, int] = {}
    for record in records:
        rows_e = encoded.rows(record.erase)
        rows_g = encoded.rows([record.guide_prompt(g) for g in record.guide])
        pair, pos_e, pos_g = encoded.pairs(rows_e, rows_g, record.token_mode)
        erase.append(states[rows_e[pair], pos_e])
        guide.append(states[rows_g[pair], pos_g])
        weight.append(torch.full((len(pair),), record.erase_scale, dtype=torch.float64, device=device))
        global_pair = pair + len(pairs)
        token_pair.append(global_pair)
        tensor_pair.append(global_pair if record.technique == "tensor" else torch.full_like(pair, -1))
        pairs.extend(zip(record.erase, record.guide))
        for prompt in record.preserve_prompts():
            preserve_keys.setdefault((prompt, record.token_mode, record.preserve_scale), len(preserve_keys))
    debias = _debias_tokens(records, encoded)
    if debias is not None:  # each debiased concept is an erase pair with itself; its attributes shift the target
        concepts, scales = debias[0], debias[1]
        erase.append(concepts)
        guide.append(concepts)
        weight.append(scales)
        tensor_pair.append(torch.full((len(concepts),), -1, dtype=torch.long, device=device))
    preserve, preserve_weight, token_preserved = [], [], []
    for (prompt, mode, scale), index in preserve_keys.items():
        row = encoded.rows([prompt])
        _, pos = encoded.preserved(row, mode)
        preserve.append(states[row[0], pos])
        preserve_weight.append(torch.full((len(pos),), scale, dtype=torch.float64, device=device))
        token_preserved.append(torch.full((len(pos),), index, dtype=torch.long, device=device))
    empty = states.new_zeros((0, states.shape[-1]), dtype=torch.float64)
    terms = EditTerms(
        erase=torch.cat(erase).double(), guide=torch.cat(guide).double(), erase_weight=torch.cat(weight),
        preserve=torch.cat(preserve).double() if preserve else empty,
        preserve_weight=torch.cat(preserve_weight) if preserve else empty[:, 0],
        tensor_pair=torch.cat(tensor_pair), lamb=records[-1].lamb,
    )
    return AssembledTerms(
        terms=terms, pairs=pairs, token_pair=torch.cat(token_pair),
        preserved=[key[0] for key in preserve_keys],
        token_preserved=torch.cat(token_preserved) if token_preserved else terms.tensor_pair[:0],
        debias=None if debias is None else debias[2:],
        debiased_concepts=tuple(t.concept for r in records for t in r.debias),
    )


def _debias_tokens(records: list[ConceptEdit], encoded: EncodedPrompts):
    """Last tokens of debiased concepts and of their attribute prompts, with their scales and weights."""
    targets = [(record, target) for record in records for target in record.debias]
    if not targets:
        return None
    states, last = encoded.states, encoded.last
    if encoded.segments:
        raise ValueError("debiasing reads one token per concept, and this pipeline's layers read several text "
                         "encoders one after the other: debias on a pipeline whose edited layers read one encoder")
    device = states.device
    rows = encoded.rows([t.concept for _, t in targets])
    concepts = states[rows, last[rows]]
    scales = torch.tensor([r.erase_scale for r, _ in targets], dtype=torch.float64, device=device)
    prompts = [p for _, t in targets for p in t.attribute_prompts()]
    rows = encoded.rows(prompts)
    attributes = states[rows, last[rows]]
    counts = torch.tensor([len(t.attribute_prompts()) for _, t in targets], device=device)
    concept_of = torch.repeat_interleave(torch.arange(len(targets), device=device), counts)
    weights = torch.tensor([w for _, t in targets for w in t.flat_weights()], dtype=torch.float64, device=device)
    return concepts, scales, attributes, concept_of, weights * scales[concept_of]


@dataclass
class Solution:
    """A solved edit: ``W'_ℓ = W_ℓ T_ℓ`` with ``T_ℓ = T + Cᵀ diag(coef[ℓ]) D`` (see `solve.Correction`).

    `low_rank`, when there are few erased tokens, is ``T − I`` in low-rank form (`solve.low_rank_delta`): fusing uses
    it instead of ``T`` (cheaper, same weights). It is derived data: edit files store ``T`` only.

    `layerwise` adds ``Uᵀ D_ℓ`` to every ``T_ℓ`` (`layerwise.Layerwise`). Precise erasure stores its change there
    with ``T = I``. A wide group solved in low-rank form (`wide.takes_low_rank`) stores its whole change there too,
    with ``transform=None`` and ``correction=None``: no d×d matrix exists for it, and every consumer (processors,
    fusing, LoRA export, the report, edit files) works on the factors.
    """

    transform: torch.Tensor | None
    correction: Correction | None
    low_rank: Correction | None = None
    layerwise: Layerwise | None = None

    def is_finite(self) -> bool:
        tensors = ([] if self.transform is None else [self.transform]) + ([] if self.correction is None else [
            self.correction.tokens, self.correction.solved, self.correction.coef])
        return all_finite(*tensors) and (
            self.layerwise is None or self.layerwise.is_finite())

    def to(self, device=None, dtype=None) -> "Solution":
        def move(c):
            if isinstance(c, Correction):
                return Correction(move(c.tokens), move(c.solved), move(c.coef))
            return None if c is None else c.to(device=device, dtype=dtype)

        layerwise = None if self.layerwise is None else self.layerwise.to(device=device, dtype=dtype)
        return Solution(move(self.transform), move(self.correction), move(self.low_rank), layerwise)


def solve(assembled: AssembledTerms, weights: torch.Tensor, row_layer: torch.Tensor, num_layers: int,
          biased: bool = False, low_rank: bool = False) -> Solution:
    """One float64 solve shared by every layer, plus the per-layer "tensor" correction when a record asks for it.

    Args:
        weights (`torch.Tensor`): ``W_all``, original weights of all layers stacked along rows (float32/64), without
            the bias column.
        row_layer (`torch.Tensor`): layer index of each row of `weights`.
        biased (`bool`, defaults to `False`): the layers keep a bias ``b``: return the homogeneous solution of
            ``W' = W T_ℓ + b uᵀ`` (see `solve.with_bias`), for ``[W | b]``.
        low_rank (`bool`, defaults to `False`): solve without any d×d matrix (Woodbury, `wide.WoodburyInverse`) and
            return the change as `Solution.layerwise` with no transform (see `wide.takes_low_rank`); not with
            `biased`.
    """
    if low_rank and biased:
        raise ValueError("the low-rank solve does not handle layers whose bias is part of the targets")
    if low_rank:
        factor = WoodburyInverse(assembled.terms)
        transform = None
    else:
        transform, factor = solve_transform(assembled.terms)
    correction = tensor_correction(weights, row_layer, num_layers, assembled.terms, factor)
    if assembled.debias is not None:
        attributes, concept_of, weight = assembled.debias
        concepts = assembled.terms.erase[len(assembled.token_pair):]
        correction = combine(correction, debias_correction(weights, row_layer, num_layers, concepts, attributes,
                                                           concept_of, weight, factor))
    if biased:  # (two layers in FLUX: the dense product is cheap there)
        transform, correction = with_bias(transform, correction, bias_direction(assembled.terms, factor))
        return Solution(transform, correction)
    if low_rank:
        return Solution(None, None, layerwise=as_layerwise(low_rank_delta(assembled.terms, factor), correction))
    few = 2 * assembled.terms.erase.shape[0] < transform.shape[0]
    return Solution(transform, correction, low_rank_delta(assembled.terms, factor) if few else None)


def homogeneous_terms(assembled: AssembledTerms) -> AssembledTerms:
    """The same terms with every token as ``[c; 1]``: what the homogeneous solution of a biased group acts on."""
    t = assembled.terms
    invariants = None if assembled.invariants is None else homogeneous(assembled.invariants)
    return replace(assembled, terms=replace(t, erase=homogeneous(t.erase), guide=homogeneous(t.guide),
                                            preserve=homogeneous(t.preserve)), invariants=invariants)

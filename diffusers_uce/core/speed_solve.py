"""Precise erasure (``method="speed"``) inside the edit engine: token selection, the joint solve, its solution.

Several precise-erasure calls are solved jointly: the erased concepts of every call together (``n`` = their total
number), with the union of their retain sets (minus the retain prompts that name an erased concept as a whole word)
and the options every call shares. Token semantics (the authors'): the last token ``k`` of erased, guide and retain
prompts; erasing exactly ``"nudity"`` uses positions 1 to the end of both the erased and the guide prompt; a retain
set of just ``""`` (also the default when no retain prompt is given) uses its positions 1 to the end.
"""

from __future__ import annotations

import torch

from .edits import ConceptEdit
from .engine import AssembledTerms, Solution
from .layerwise import Layerwise
from .precise import default_invariants, speed_update
from .prompts import EncodedPrompts
from .solve import EditTerms
from .speed_options import drop_erased

FULL_PROMPT_CONCEPTS = ("nudity",)


def retain_prompts(records: list[ConceptEdit]) -> tuple[list[str], list[str]]:
    """The joint retain set (kept, dropped): the union of the records' `preserve`, `[""]` when empty."""
    erased = [e for r in records for e in r.erase]
    retain = list(dict.fromkeys(p for r in records for p in r.preserve)) or [""]
    return drop_erased(retain, erased)


def speed_prompts(records: list[ConceptEdit]) -> list[str]:
    """Every prompt a joint precise-erasure solve needs encoded."""
    options = records[-1].method_options
    invariants = options["invariants"]
    extra = [""] + (invariants if invariants and isinstance(invariants[0], str) and invariants != "auto" else [])
    return [*(p for r in records for p in (*r.erase, *r.guide)), *retain_prompts(records)[0], *extra]


def full_length_prompts(records: list[ConceptEdit]) -> list[str]:
    """The prompts whose every position is read (the others only up to their last token, so a causal text encoder
    may stop there): `""` (automatic invariants, a retain set of just `""`) and erased "nudity" with its guide."""
    full = [p for r in records for e, g in zip(r.erase, r.guide) if e in FULL_PROMPT_CONCEPTS for p in (e, g)]
    if records[-1].method_options["invariants"] == "auto" or retain_prompts(records)[0] == [""]:
        full.append("")
    return list(dict.fromkeys(full))


def merge_encoded(cut: EncodedPrompts, full: EncodedPrompts) -> EncodedPrompts:
    """One `EncodedPrompts` from states encoded up to the last tokens (`cut`) and at full length (`full`)."""
    states = full.states.new_zeros((len(cut.index) + len(full.index), full.states.shape[1], full.states.shape[2]))
    states[: len(cut.index), : cut.states.shape[1]] = cut.states
    states[len(cut.index):] = full.states
    index = {**{p: i + len(cut.index) for p, i in full.index.items()}, **{p: i for p, i in cut.index.items()
                                                                            if p not in full.index}}
    return EncodedPrompts(index=index, states=states, last=torch.cat([cut.last, full.last]),
                          max_length=full.max_length)


def _positions(length: int) -> torch.Tensor:
    return torch.arange(1, length) if length > 1 else torch.zeros(1, dtype=torch.long)


def _prompt_tokens(encoded: EncodedPrompts, prompt: str, full: bool) -> torch.Tensor:
    row = encoded.index[prompt]
    states = encoded.states[row]
    positions = _positions(states.shape[0]) if full else encoded.last[row].reshape(-1).cpu()
    return states[positions.to(states.device)].double()


def assemble_speed(records: list[ConceptEdit], encoded: EncodedPrompts) -> AssembledTerms:
    """Select the erased, guide, retain and invariant tokens of jointly solved precise-erasure records."""
    erase, guide, token_pair, pairs = [], [], [], []
    for record in records:
        for concept, target in zip(record.erase, record.guide):
            full = concept in FULL_PROMPT_CONCEPTS
            e, g = _prompt_tokens(encoded, concept, full), _prompt_tokens(encoded, target, full)
            count = min(len(e), len(g))
            erase.append(e[:count])
            guide.append(g[:count])
            token_pair.append(torch.full((count,), len(pairs), dtype=torch.long))
            pairs.append((concept, target))
    kept, dropped = retain_prompts(records)
    retain = [_prompt_tokens(encoded, p, kept == [""]) for p in kept]
    token_preserved = torch.cat([torch.full((len(t),), i, dtype=torch.long) for i, t in enumerate(retain)])
    erase, guide, retain = torch.cat(erase), torch.cat(guide), torch.cat(retain)
    device = erase.device
    terms = EditTerms(erase=erase, guide=guide, erase_weight=erase.new_ones(len(erase)), preserve=retain,
                      preserve_weight=retain.new_ones(len(retain)),
                      tensor_pair=torch.full((len(erase),), -1, dtype=torch.long, device=device),
                      lamb=records[-1].lamb)
    return AssembledTerms(terms=terms, pairs=pairs, token_pair=torch.cat(token_pair).to(device), preserved=kept,
                          token_preserved=token_preserved.to(device),
                          invariants=_invariant_tokens(records[-1].method_options["invariants"], encoded),
                          retain_dropped=tuple(dropped))


def _invariant_tokens(invariants, encoded: EncodedPrompts) -> torch.Tensor:
    d = encoded.states.shape[-1]
    if invariants == "auto":
        states = encoded.states[encoded.index[""]]
        return default_invariants(states, num_centres=min(3, states.shape[0] - 1))
    if isinstance(invariants[0], str):  # every real token of each prompt, once (CLIP's start token is shared)
        rows = encoded.rows(invariants)
        tokens = torch.cat([encoded.states[r, encoded.real_positions(r)] for r in rows]).double()
        distance = torch.cdist(tokens, tokens)
        repeat = (distance <= 1e-6 * tokens.norm(dim=1).clamp_min(1e-12)[None]).tril(-1).any(1)
        return tokens[~repeat]
    tokens = torch.tensor(invariants, dtype=torch.float64, device=encoded.states.device)
    if tokens.shape[1] != d:
        raise ValueError(f"method_options['invariants'] has tokens of width {tokens.shape[1]}, but the edited layers "
                         f"read text states of width {d}: give ({len(tokens)}, {d}) tokens, or prompts instead")
    return tokens


def solve_speed(assembled: AssembledTerms, options: dict, weights: torch.Tensor, row_layer: torch.Tensor,
                num_layers: int, biased: bool = False, singular: torch.Tensor | None = None):
    """The precise-erasure solution of one target group: ``T_ℓ = I + Uᵀ D_ℓ`` (`Solution.layerwise`).

    Args:
        weights (`torch.Tensor`): ``W_all`` without any bias column; a biased group's bias is left unchanged
            (``W' = W T_ℓ``, ``b' = b``): its solution is the zero-padded homogeneous form.
        singular (`torch.Tensor`, *optional*): cached `precise.smallest_right_singular_vectors` of `weights`.

    Returns:
        `tuple[Solution, SpeedUpdate]`: the solution and the update with what the prior refinement kept.
    """
    terms = assembled.terms
    update = speed_update(
        terms.erase, terms.guide, len(assembled.pairs), terms.preserve, assembled.invariants,
        threshold=options["threshold"], retain_scale=options["retain_scale"], invariant_lamb=options["invariant_lamb"],
        augment=options["augment"], filter=options["filter"], seed=options["seed"], weights=weights,
        row_layer=row_layer, num_layers=num_layers, singular=singular,
    )
    change = Layerwise(update.up_tokens, update.down)
    d = weights.shape[1] + biased
    eye = torch.eye(d, dtype=torch.float64, device=update.down.device)
    return Solution(eye, None, layerwise=change.homogeneous() if biased else change), update

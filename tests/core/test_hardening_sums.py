"""The hardening replay from token sums (diffusers_uce.core.hardening) equals the token path of
diffusers_uce.core.robust on random data, with and without a bias, with per-concept Grams or token products."""

import dataclasses
import math

import pytest
import torch

from diffusers_uce.core import hardening
from diffusers_uce.core.hardening import HardenBlock, replay_hardening
from diffusers_uce.core.robust import harden, stacked_gram
from diffusers_uce.core.solve import EditTerms, solve_transform, transform_from_sums, with_bias

F64 = torch.float64
D, CONCEPTS, POSITIONS, ROUNDS = 10, 3, 6, 3


def rel(a, b):
    return float((a - b).norm() / b.norm())


def hom(x):
    return torch.nn.functional.pad(x, (0, 1), value=1.0)


def setup(biased: bool, shared_guide: bool, seed=0):
    g = torch.Generator().manual_seed(seed)
    layers = [torch.randn(o, D + biased, generator=g, dtype=F64) / math.sqrt(D) for o in (7, 12, 20)]
    n = CONCEPTS * POSITIONS
    erase = torch.randn(n, D, generator=g, dtype=F64)
    guide = torch.randn(POSITIONS if shared_guide else n, D, generator=g, dtype=F64)
    guide = guide.repeat(CONCEPTS, 1) if shared_guide else guide  # one guide prompt for every concept, or one each
    preserve = torch.randn(4, D, generator=g, dtype=F64)
    weight = torch.full((4,), 0.3, dtype=F64)
    terms = EditTerms(erase=erase, guide=guide, erase_weight=torch.ones(n, dtype=F64), preserve=preserve,
                      preserve_weight=weight, tensor_pair=torch.full((n,), -1), lamb=0.5)
    transform, _ = solve_transform(terms)
    if biased:
        transform = with_bias(transform, None, torch.randn(D, generator=g, dtype=F64) / 10)[0]
        erase, guide, preserve = hom(erase), hom(guide), hom(preserve)
    concept = torch.arange(CONCEPTS).repeat_interleave(POSITIONS)
    block = HardenBlock(erase, guide, concept, CONCEPTS, preserve, weight, ROUNDS, 0.1, 0.1)
    return stacked_gram(layers), transform, block


def test_transform_from_sums_equals_solve_transform():
    g = torch.Generator().manual_seed(1)
    erase, guide, preserve = (torch.randn(m, D, generator=g, dtype=F64) for m in (30, 30, 5))
    w, wp = torch.rand(30, generator=g, dtype=F64), torch.rand(5, generator=g, dtype=F64)
    terms = EditTerms(erase, guide, w, preserve, wp, torch.full((30,), -1), 0.2)
    expected, factor = solve_transform(terms)
    got, got_factor = transform_from_sums((erase * w[:, None]).T @ erase, guide.T @ (erase * w[:, None]),
                                          (preserve * wp[:, None]).T @ preserve, 0.2)
    assert rel(got, expected) < 1e-12 and rel(got_factor, factor) < 1e-12


@pytest.mark.parametrize("biased", [False, True])
@pytest.mark.parametrize("shared_guide", [False, True])
@pytest.mark.parametrize("path", ["grams", "products", "tokens"])  # sums with per-concept Grams or token products
def test_sums_replay_equals_token_path(biased, shared_guide, path, monkeypatch):
    gram, transform, block = setup(biased, shared_guide)
    monkeypatch.setattr(hardening, "SUMS_FROM", float("inf") if path == "tokens" else 0.0)
    monkeypatch.setattr(hardening, "GRAM_BUDGET", 0 if path == "products" else hardening.GRAM_BUDGET)
    hardened, (sums,) = replay_hardening(gram, transform, [block], biased)
    reference = harden(gram, transform, block.erase, block.guide, block.preserve, ROUNDS, reg=block.reg,
                       lamb=block.lamb, preserve_scale=block.preserve_weight, biased=biased,
                       group_index=block.concept)
    assert rel(hardened, reference.transform) < 1e-10
    moved, gap, top, bottom = sums.unbind(1)
    assert rel(1 - (moved / gap).sqrt(), reference.recovery) < 1e-10
    assert rel((top / bottom).sqrt(), reference.norm_ratio) < 1e-10
    measured = replay_hardening(gram, reference.transform, [HardenBlock(*[*block.__dict__.values()][:6], 0, 0.1,
                                                                        0.1)], biased)[1][0]
    assert rel(measured[0], sums[-1]) < 1e-10  # a block without rounds: measured once, the same numbers


def test_guide_keys_find_the_distinct_guides(monkeypatch):
    """Keys of the guide tokens (prompt and position) find the same distinct guides as comparing their rows."""
    gram, transform, block = setup(False, shared_guide=True)
    keyed = dataclasses.replace(block, guide_key=torch.arange(POSITIONS).repeat(CONCEPTS) * 7 + 3)
    guides, _ = hardening.block_sums(gram, keyed, False).cross
    assert guides.shape[0] == POSITIONS and {tuple(r.tolist()) for r in guides} == {
        tuple(r.tolist()) for r in block.guide[:POSITIONS]}
    monkeypatch.setattr(hardening, "SUMS_FROM", 0.0)
    (plain, plain_sums), (got, got_sums) = (replay_hardening(gram, transform, [b], False) for b in (block, keyed))
    assert rel(got, plain) < 1e-12 and rel(got_sums[0], plain_sums[0]) < 1e-12


@pytest.mark.parametrize("biased", [False, True])
def test_blocks_without_rounds_are_measured_together_as_alone(biased):
    """Edits that are not hardened share one attack per ρ; each is measured as if alone."""
    gram, transform, block = setup(biased, shared_guide=True)
    first = dataclasses.replace(block, rounds=0)
    second = dataclasses.replace(setup(biased, shared_guide=False, seed=1)[2], rounds=0)
    other_reg = dataclasses.replace(first, reg=0.5)
    _, together = replay_hardening(gram, transform, [first, second, other_reg], biased)
    alone = [replay_hardening(gram, transform, [b], biased)[1][0] for b in (first, second, other_reg)]
    assert all(rel(t, a) < 1e-12 for t, a in zip(together, alone))

"""RECE hardening (diffusers_uce.core.robust) against an independent per-layer float64 transcription."""

import math

import pytest
import torch

from diffusers_uce.core.robust import (
    adversarial_embeddings,
    adversarial_recovery,
    harden,
    hardening_round,
    stacked_gram,
)
from diffusers_uce.core.solve import EditTerms, bias_direction, solve_transform, with_bias

F64 = torch.float64
D = 16
OUT_SIZES = (8, 12, 16, 20, 24)
RHO, LAMB, S_E, S_P = 0.1, 0.1, 1.0, 0.1


def rel(a, b):
    return float((a - b).norm() / b.norm())


def setup(seed=0, biased=False):
    """Five layers of different output sizes, 3 concepts × 2 tokens erased into guides, 4 preserved tokens, and the
    UCE edit ``T`` (homogeneous when biased)."""
    g = torch.Generator().manual_seed(seed)
    layers = [torch.randn(o, D, generator=g, dtype=F64) / math.sqrt(D) for o in OUT_SIZES]
    biases = [torch.randn(o, generator=g, dtype=F64) for o in OUT_SIZES]
    erase = torch.randn(6, D, generator=g, dtype=F64)
    guide = torch.randn(6, D, generator=g, dtype=F64)
    preserve = torch.randn(4, D, generator=g, dtype=F64)
    terms = EditTerms(erase=erase, guide=guide, erase_weight=torch.ones(6, dtype=F64), preserve=preserve,
                      preserve_weight=torch.ones(4, dtype=F64), tensor_pair=torch.full((6,), -1), lamb=0.5)
    transform, factor = solve_transform(terms)
    u = bias_direction(terms, factor)
    if biased:
        transform = with_bias(transform, None, u)[0]
    return {"layers": layers, "biases": biases, "erase": erase, "guide": guide, "preserve": preserve,
            "transform": transform, "u": u, "group": torch.tensor([0, 0, 1, 1, 2, 2])}


def hom(x):
    return torch.cat([x, torch.ones(x.shape[0], 1, dtype=F64)], 1)


# ---- the independent transcription: per-layer loops, explicit inverses, exactly as RECE writes it ----

def ref_adversarial(originals, edited, tokens, rho):
    """``c' = (ρI + Σ_ℓ W'_ℓᵀ W'_ℓ)⁻¹ (Σ_ℓ W'_ℓᵀ W_ℓ) c`` for each row c."""
    a = rho * torch.eye(D, dtype=F64) + sum(w.T @ w for w in edited)
    b = sum(we.T @ w for we, w in zip(edited, originals))
    return (torch.linalg.inv(a) @ b @ tokens.T).T


def ref_round(current, cprime, guide, preserve, biases=None):
    """Per-layer UCE from the current weights, erasing c' into c*; with biases, the targets include the bias."""
    b_inv = torch.linalg.inv(LAMB * torch.eye(D, dtype=F64) + S_E * cprime.T @ cprime + S_P * preserve.T @ preserve)
    out = []
    for i, w in enumerate(current):
        shift = 0 if biases is None else biases[i][:, None]
        num = LAMB * w + S_E * (w @ guide.T + shift) @ cprime + S_P * (w @ preserve.T + shift) @ preserve
        out.append(num @ b_inv)
    return out


def ref_recovery(originals, edited, tokens, guides, cprime, group):
    num, den, top, bottom = (torch.zeros(int(group.max()) + 1, dtype=F64) for _ in range(4))
    for k in range(tokens.shape[0]):
        g = group[k]
        for w, we in zip(originals, edited):
            num[g] += (we @ cprime[k] - w @ tokens[k]).square().sum()
            den[g] += (w @ tokens[k] - w @ guides[k]).square().sum()
        top[g] += cprime[k].square().sum()
        bottom[g] += tokens[k].square().sum()
    return 1 - num.sqrt() / den.sqrt(), top.sqrt() / bottom.sqrt()


# ---- tests ----

def test_stacked_gram_chunked_and_per_layer():
    s = setup()
    expected = sum(w.T @ w for w in s["layers"])
    stacked = torch.cat(s["layers"]).float()
    assert rel(stacked_gram(stacked, chunk_size=7), stacked.double().T @ stacked.double()) < 1e-12
    assert stacked_gram(stacked).dtype == F64
    assert rel(stacked_gram(s["layers"], chunk_size=5), expected) < 1e-12


def test_three_rounds_match_per_layer_rece():
    s = setup()
    gram = stacked_gram(s["layers"])
    transform, current = s["transform"], [w @ s["transform"] for w in s["layers"]]
    for _ in range(3):
        step, cprime = hardening_round(gram, transform, s["erase"], s["guide"], s["preserve"], reg=RHO, lamb=LAMB,
                                       erase_scale=S_E, preserve_scale=S_P)
        expected_cprime = ref_adversarial(s["layers"], current, s["erase"], RHO)
        assert rel(cprime, expected_cprime) < 1e-10
        current = ref_round(current, expected_cprime, s["guide"], s["preserve"])
        transform = transform @ step
        for w, w_new in zip(s["layers"], current):
            assert rel(w @ transform, w_new) < 1e-10


def test_harden_chains_rounds_and_recovery_falls():
    s = setup()
    gram = stacked_gram(s["layers"])
    result = harden(gram, s["transform"], s["erase"], s["guide"], s["preserve"], 3, reg=RHO, lamb=LAMB,
                    erase_scale=S_E, preserve_scale=S_P, group_index=s["group"])
    assert len(result.steps) == 3 and result.recovery.shape == result.norm_ratio.shape == (4, 3)
    transform = s["transform"]
    for step in result.steps:
        expected, _ = hardening_round(gram, transform, s["erase"], s["guide"], s["preserve"], reg=RHO, lamb=LAMB)
        assert rel(step, expected) < 1e-12
        transform = transform @ step
    assert rel(result.transform, transform) < 1e-12
    # each round lowers the total; each concept ends below where it started (a single concept may tick up in a
    # later round: the attacker finds a new direction, so per-concept monotonicity is not guaranteed)
    total = result.recovery.sum(1)
    assert (total[1:] < total[:-1]).all(), result.recovery
    assert (result.recovery[1] < result.recovery[0]).all() and (result.recovery[-1] < result.recovery[0]).all()
    assert (result.recovery[0] > 0.5).all()  # plain UCE: the attacker gets most of each concept back
    # row r is measured against the transform after r rounds
    last = adversarial_embeddings(gram, result.transform, s["erase"], RHO)
    rec, ratio = adversarial_recovery(gram, result.transform, s["erase"], s["guide"], last, s["group"])
    assert torch.allclose(rec, result.recovery[-1]) and torch.allclose(ratio, result.norm_ratio[-1])
    zero = harden(gram, s["transform"], s["erase"], s["guide"], s["preserve"], 0, reg=RHO, group_index=s["group"])
    assert zero.steps == [] and torch.equal(zero.transform, s["transform"]) and zero.recovery.shape == (1, 3)
    assert torch.allclose(zero.recovery[0], result.recovery[0])


def test_recovery_matches_per_layer_computation():
    s = setup()
    gram = stacked_gram(s["layers"])
    edited = [w @ s["transform"] for w in s["layers"]]
    cprime = adversarial_embeddings(gram, s["transform"], s["erase"], RHO)
    rec, ratio = adversarial_recovery(gram, s["transform"], s["erase"], s["guide"], cprime, s["group"])
    exp_rec, exp_ratio = ref_recovery(s["layers"], edited, s["erase"], s["guide"], cprime, s["group"])
    assert rel(rec, exp_rec) < 1e-10 and rel(ratio, exp_ratio) < 1e-10
    # unedited layers: the attacker simply uses the concept (recovery ≈ 1, ratio ≈ 1)
    eye = torch.eye(D, dtype=F64)
    plain = adversarial_embeddings(gram, eye, s["erase"], 1e-9)
    rec, ratio = adversarial_recovery(gram, eye, s["erase"], s["guide"], plain)
    assert rec.shape == (6,) and torch.allclose(rec, torch.ones(6, dtype=F64), atol=1e-6)
    assert torch.allclose(ratio, torch.ones(6, dtype=F64), atol=1e-6)


def test_recovery_zero_denominators_give_zero():
    s = setup()
    gram = stacked_gram(s["layers"])
    erase = s["erase"].clone()
    erase[4:] = 0
    guide = s["guide"].clone()
    guide[:2] = erase[:2]  # concept 0 is its own guide, concept 2 is all zeros, concept 3 has no tokens
    cprime = adversarial_embeddings(gram, s["transform"], erase, RHO)
    rec, ratio = adversarial_recovery(gram, s["transform"], erase, guide, cprime, torch.tensor([0, 0, 1, 1, 4, 4]))
    assert torch.isfinite(rec).all() and torch.isfinite(ratio).all()
    assert rec[0] == 0 and rec[2] == 0 and rec[3] == 0 and ratio[2] == 0 and ratio[3] == 0
    assert rec[1] != 0 and ratio[0] != 0


def test_biased_attack_is_a_minimum_and_matches_layerwise_formula():
    s = setup(biased=True)
    weights = [torch.cat([w, b[:, None]], 1) for w, b in zip(s["layers"], s["biases"])]
    gram = stacked_gram(weights)
    tokens = hom(s["erase"])
    cprime = adversarial_embeddings(gram, s["transform"], tokens, RHO, biased=True)
    assert cprime.shape == (6, D + 1) and (cprime[:, -1] == 1).all()
    # a d-column input is taken as [c, 1]
    assert torch.equal(adversarial_embeddings(gram, s["transform"], s["erase"], RHO, biased=True), cprime)
    # gradient of Σ_ℓ ‖[W|b] T̃ [x;1] − [W|b] [c;1]‖² + ρ‖x‖² vanishes at the returned x
    x = cprime[:, :D].clone().requires_grad_(True)
    loss = sum((hom(x) @ (w @ s["transform"]).T - tokens @ w.T).square().sum() for w in weights)
    (grad,) = torch.autograd.grad(loss + RHO * x.square().sum(), x)
    assert float(grad.abs().max()) < 1e-10 * float(loss.detach())
    # RECE's formula with the biased edit W' = W T + b uᵀ (the kept bias cancels in the objective)
    edited = [w @ s["transform"][:D, :D] + b[:, None] * s["u"][None] for w, b in zip(s["layers"], s["biases"])]
    assert rel(cprime[:, :D], ref_adversarial(s["layers"], edited, s["erase"], RHO)) < 1e-10


def test_biased_rounds_match_layerwise_formula():
    s = setup(biased=True)
    weights = [torch.cat([w, b[:, None]], 1) for w, b in zip(s["layers"], s["biases"])]
    gram = stacked_gram(weights)
    transform = s["transform"]
    current = [w @ transform[:D, :D] + b[:, None] * s["u"][None] for w, b in zip(s["layers"], s["biases"])]
    for _ in range(3):
        step, cprime = hardening_round(gram, transform, hom(s["erase"]), hom(s["guide"]), hom(s["preserve"]),
                                       reg=RHO, lamb=LAMB, erase_scale=S_E, preserve_scale=S_P, biased=True)
        expected_cprime = ref_adversarial(s["layers"], current, s["erase"], RHO)
        assert rel(cprime[:, :D], expected_cprime) < 1e-10
        current = ref_round(current, expected_cprime, s["guide"], s["preserve"], s["biases"])
        transform = transform @ step
        for w, w_new, b in zip(weights, current, s["biases"]):
            assert rel(w @ transform, torch.cat([w_new, b[:, None]], 1)) < 1e-10
    # recovery in the biased case: the constant coordinate is in the outputs, not in the norm ratio
    rec, ratio = adversarial_recovery(gram, transform, hom(s["erase"]), hom(s["guide"]), cprime, biased=True)
    exp_rec, _ = ref_recovery(weights, [w @ transform for w in weights], hom(s["erase"]), hom(s["guide"]), cprime,
                              torch.arange(6))
    assert rel(rec, exp_rec) < 1e-10
    assert rel(ratio, cprime[:, :D].norm(dim=1) / s["erase"].norm(dim=1)) < 1e-12
    result = harden(gram, s["transform"], s["erase"], s["guide"], s["preserve"], 3, reg=RHO, biased=True,
                    group_index=s["group"])
    total = result.recovery.sum(1)
    assert (total[1:] < total[:-1]).all() and (result.recovery[-1] < result.recovery[0]).all()


def test_per_row_scales_equal_scalars():
    s = setup()
    gram = stacked_gram(s["layers"])
    args = (gram, s["transform"], s["erase"], s["guide"], s["preserve"])
    a, _ = hardening_round(*args, reg=RHO, erase_scale=2.0, preserve_scale=0.3)
    b, _ = hardening_round(*args, reg=RHO, erase_scale=torch.full((6,), 2.0, dtype=F64),
                         preserve_scale=torch.full((4,), 0.3, dtype=F64))
    assert rel(a, b) < 1e-14


@pytest.mark.parametrize(
    "option, value",
    [("reg", 0.0), ("reg", -1.0), ("reg", math.nan), ("reg", math.inf), ("lamb", 0.0), ("lamb", math.nan),
     ("preserve_scale", 0.0), ("preserve_scale", -0.1), ("preserve_scale", math.inf), ("erase_scale", -1.0),
     ("erase_scale", math.nan), ("rounds", -1), ("rounds", 1.5), ("rounds", True)],
)
def test_bad_options_raise(option, value):
    s = setup()
    gram = stacked_gram(s["layers"])
    kwargs = {"reg": RHO, "lamb": LAMB, "erase_scale": S_E, "preserve_scale": S_P}
    rounds = value if option == "rounds" else 1
    if option != "rounds":
        kwargs[option] = value
    with pytest.raises(ValueError, match=option):
        harden(gram, s["transform"], s["erase"], s["guide"], s["preserve"], rounds, **kwargs)
    if option != "rounds":
        with pytest.raises(ValueError, match=option):
            hardening_round(gram, s["transform"], s["erase"], s["guide"], s["preserve"], **kwargs)


def test_non_finite_and_mismatched_inputs_refused():
    s = setup()
    gram = stacked_gram(s["layers"])
    args = {"gram": gram, "transform": s["transform"], "erase": s["erase"], "guide": s["guide"],
            "preserve": s["preserve"]}
    for name, value in args.items():
        bad = dict(args)
        bad[name] = value.clone()
        bad[name][0, 0] = math.nan
        with pytest.raises(ValueError, match="non-finite"):
            harden(**bad, rounds=1, reg=RHO)
    with pytest.raises(ValueError, match="non-finite"):
        stacked_gram([s["layers"][0], torch.full((2, D), math.inf)])
    with pytest.raises(ValueError, match="nothing was changed"):  # a round that overflows
        harden(**args, rounds=1, reg=RHO, erase_scale=1e308)
    with pytest.raises(ValueError, match="guide"):
        harden(**{**args, "guide": s["guide"][:5]}, rounds=1, reg=RHO)
    with pytest.raises(ValueError, match="shape"):
        harden(**{**args, "erase": s["erase"][:, :5]}, rounds=1, reg=RHO)
    with pytest.raises(ValueError, match="group_index"):
        harden(**args, rounds=1, reg=RHO, group_index=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="last column"):
        adversarial_embeddings(stacked_gram([hom(w) for w in s["layers"]]), torch.eye(D + 1, dtype=F64),
                               torch.zeros(2, D + 1, dtype=F64), RHO, biased=True)

"""Forms of the solution that must give the same weights: the low-rank ``T − I`` used to fuse, the homogeneous
form of a biased layer."""

import torch

from diffusers_uce.core.solve import (
    EditTerms,
    bias_direction,
    edited_weights,
    low_rank_delta,
    scaled,
    solve_transform,
    tensor_correction,
    with_bias,
)


def terms(n=3, m=4, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return EditTerms(erase=r(n, d), guide=r(n, d), erase_weight=torch.rand(n, generator=g, dtype=torch.float64) + 0.5,
                     preserve=r(m, d), preserve_weight=torch.full((m,), 0.3, dtype=torch.float64),
                     tensor_pair=torch.tensor([0, -1, 1]), lamb=0.5)


def test_low_rank_delta_fuses_like_the_transform():
    t = terms()
    weights = torch.randn(10, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    row_layer = torch.tensor([0] * 4 + [1] * 6)
    transform, factor = solve_transform(t)
    correction = tensor_correction(weights, row_layer, 2, t, factor)
    delta = low_rank_delta(t, factor)
    assert torch.allclose(delta.tokens.T @ torch.diag(delta.coef[0]) @ delta.solved, transform - torch.eye(8))
    for s in (1.0, 0.4, 2.0):
        dense = edited_weights(weights, *scaled(transform, correction, s), row_layer)
        low = edited_weights(weights, *scaled(delta, correction, s), row_layer)
        assert torch.allclose(low, dense, rtol=0, atol=1e-12)


def test_biased_layer_homogeneous_form():
    t = terms(seed=2)
    w = torch.randn(5, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    b = torch.randn(5, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    transform, factor = solve_transform(t)
    # the definition: targets include the bias, the layer keeps it
    lhs = 0.5 * w + ((t.guide @ w.T + b) * t.erase_weight[:, None]).T @ t.erase + (
        (t.preserve @ w.T + b) * t.preserve_weight[:, None]).T @ t.preserve
    big_b = 0.5 * torch.eye(8) + (t.erase * t.erase_weight[:, None]).T @ t.erase + (
        t.preserve * t.preserve_weight[:, None]).T @ t.preserve
    expected = lhs @ torch.linalg.inv(big_b)
    tilde, _ = with_bias(transform, None, bias_direction(t, factor))
    fused = edited_weights(torch.cat([w, b[:, None]], dim=1), tilde)
    assert torch.allclose(fused[:, :8], expected, atol=1e-10) and torch.equal(fused[:, 8], b)

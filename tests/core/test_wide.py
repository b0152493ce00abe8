"""The low-rank (Woodbury) solve of wide groups equals the dense solve, and never forms a d×d matrix."""

import time

import pytest
import torch

from diffusers_uce.core import engine
from diffusers_uce.core.layerwise import add_layerwise
from diffusers_uce.core.solve import (
    EditTerms,
    debias_correction,
    edited_weights,
    low_rank_delta,
    solve_transform,
    tensor_correction,
)
from diffusers_uce.core.wide import WoodburyInverse, as_layerwise, is_wide, takes_low_rank


def terms(n=3, m=4, d=24, seed=0, zero_preserve=False):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    wp = torch.rand(m, generator=g, dtype=torch.float64)
    if zero_preserve:
        wp[0] = 0.0  # a zero weight must not break the SPD form
    return EditTerms(erase=r(n, d), guide=r(n, d), erase_weight=torch.rand(n, generator=g, dtype=torch.float64) + 0.5,
                     preserve=r(m, d), preserve_weight=wp, tensor_pair=torch.tensor([0, -1, 1][:n]), lamb=0.3)


def relative(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("seed,zero", [(0, False), (1, True), (2, False)])
def test_woodbury_delta_equals_dense(seed, zero):
    t = terms(seed=seed, zero_preserve=zero)
    transform, factor = solve_transform(t)
    dense = low_rank_delta(t, factor)
    low = low_rank_delta(t, WoodburyInverse(t))
    assert relative(low.solved, dense.solved) < 1e-10
    change = as_layerwise(low)
    eye = torch.eye(t.erase.shape[1], dtype=torch.float64)
    assert relative(change.up.T @ change.down[0], transform - eye) < 1e-10


def test_woodbury_tensor_and_debias_corrections_equal_dense():
    t = terms(d=16)
    weights = torch.randn(10, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    row_layer = torch.tensor([0] * 4 + [1] * 6)
    transform, factor = solve_transform(t)
    woodbury = WoodburyInverse(t)
    dense_c = tensor_correction(weights, row_layer, 2, t, factor)
    low_c = tensor_correction(weights, row_layer, 2, t, woodbury)
    assert relative(low_c.solved, dense_c.solved) < 1e-10
    args = (weights, row_layer, 2, t.erase[:2], t.preserve[:3], torch.tensor([0, 1, 1]),
            torch.ones(3, dtype=torch.float64))
    assert relative(debias_correction(*args, woodbury).solved, debias_correction(*args, factor).solved) < 1e-10
    # the whole per-layer change as factors gives the dense per-layer weights
    expected = edited_weights(weights, transform, dense_c, row_layer)
    change = as_layerwise(low_rank_delta(t, woodbury), low_c)
    got = add_layerwise(weights.clone(), weights, change, row_layer)
    assert relative(got, expected) < 1e-10


def test_engine_low_rank_solution_has_no_transform():
    t = terms(d=16)
    assembled = engine.AssembledTerms(terms=t, pairs=[("a", "b")] * 3, token_pair=torch.arange(3), preserved=["p"],
                                      token_preserved=torch.zeros(4, dtype=torch.long))
    weights = torch.randn(6, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    row_layer = torch.zeros(6, dtype=torch.long)
    low = engine.solve(assembled, weights, row_layer, 1, low_rank=True)
    dense = engine.solve(assembled, weights, row_layer, 1)
    assert low.transform is None and low.correction is None and low.is_finite()
    fused = edited_weights(weights, None, None, row_layer, layerwise=low.layerwise)
    assert relative(fused, edited_weights(weights, dense.transform, dense.correction, row_layer)) < 1e-10
    with pytest.raises(ValueError, match="bias"):
        engine.solve(assembled, weights, row_layer, 1, biased=True, low_rank=True)


def test_no_d_by_d_tensor_is_built(monkeypatch):
    d = 20000
    t = terms(n=3, m=2, d=d)
    t.tensor_pair = torch.full((3,), -1)
    seen = []
    real_matmul, real_cholesky = torch.Tensor.__matmul__, torch.linalg.cholesky_ex

    def matmul(a, b):
        out = real_matmul(a, b)
        seen.append(tuple(out.shape))
        return out

    monkeypatch.setattr(torch.Tensor, "__matmul__", matmul)
    monkeypatch.setattr(torch.linalg, "cholesky_ex", lambda x: (seen.append(tuple(x.shape)), real_cholesky(x))[1])
    start = time.perf_counter()
    change = as_layerwise(low_rank_delta(t, WoodburyInverse(t)))
    assert time.perf_counter() - start < 1.0
    assert tuple(change.up.shape) == (3, d) and tuple(change.down.shape) == (1, 3, d)
    assert seen and all(min(s) < 100 for s in seen if len(s) == 2)  # every product has a side of k = 5


def test_thresholds():
    assert is_wide(15360) and not is_wide(4096) and is_wide(4096, per_layer=True) and not is_wide(1152, True)
    assert takes_low_rank(15360, 5) and not takes_low_rank(15360, 7680) and not takes_low_rank(768, 1)
    with pytest.raises(ValueError, match="lamb"):
        WoodburyInverse(EditTerms(**{**terms().__dict__, "lamb": 0.0}))

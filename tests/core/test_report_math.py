"""The report's distances: Gram form, stacked-weight form and the plain per-layer definition agree."""

import torch

from diffusers_uce.core.solve import Correction, grouped_grams, output_distances


def test_distance_forms_agree():
    g = torch.Generator().manual_seed(0)
    layers = [torch.randn(n, 6, generator=g, dtype=torch.float64) for n in (3, 5, 3)]
    t = torch.eye(6, dtype=torch.float64) + 0.1 * torch.randn(6, 6, generator=g, dtype=torch.float64)
    x, y = torch.randn(4, 6, generator=g, dtype=torch.float64), torch.randn(4, 6, generator=g, dtype=torch.float64)
    plain = sum(((x @ t.T - y) @ w.T).pow(2).sum(-1) for w in layers)
    stacked = torch.cat(layers)
    assert torch.allclose(output_distances(grouped_grams(layers), t, None, x, y), plain)
    assert torch.allclose(output_distances((stacked.T @ stacked)[None], t, None, x, y), plain)
    assert torch.allclose(output_distances(stacked, t, None, x, y), plain)
    c = Correction(torch.randn(2, 6, generator=g, dtype=torch.float64), torch.randn(2, 6, generator=g,
                   dtype=torch.float64), torch.randn(3, 2, generator=g, dtype=torch.float64))
    per_layer = sum(((x @ (t + c.tokens.T @ torch.diag(c.coef[i]) @ c.solved).T - y) @ w.T).pow(2).sum(-1)
                    for i, w in enumerate(layers))
    assert torch.allclose(output_distances(grouped_grams(layers), t, c, x, y), per_layer)

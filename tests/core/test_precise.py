"""SPEED (null-space constrained erasure): the fast solve against a plain float64 transcription of the formula.

The transcription below forms every d×d matrix explicitly (retain covariance, its eigendecomposition, inverses) and
loops over layers, filter tokens and augmented copies one by one, so it shares no structure with the package code.
"""

import math
from types import SimpleNamespace

import pytest
import torch

from diffusers_uce.core.precise import (
    SpeedUpdate,
    apply_update,
    augmentation_scalars,
    augmented_copies,
    default_invariants,
    kmeans,
    retain_directions,
    smallest_right_singular_vectors,
    speed_update,
)
from diffusers_uce.core.speed_options import drop_erased

F64 = torch.float64
D = 32
OUTS = [16, 48, 32, 48, 16]  # fewer, more and as many outputs as inputs
NUM_CONCEPTS = 3
TAU = 0.1


def make_problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    weights = [torch.randn(o, D, generator=g, dtype=F64) / math.sqrt(D) for o in OUTS]
    erase = torch.randn(6, D, generator=g, dtype=F64)
    guide = torch.randn(6, D, generator=g, dtype=F64)
    span = torch.linalg.qr(torch.randn(D, 8, generator=g, dtype=F64)).Q  # retain tokens use 8 of 32 directions
    retain = (torch.randn(20, 8, generator=g, dtype=F64) * 3) @ span.T
    invariants = torch.randn(3, D, generator=g, dtype=F64)
    return weights, erase, guide, retain, invariants


def stacked(weights):
    sizes = torch.tensor([w.shape[0] for w in weights])
    return torch.cat(weights), torch.repeat_interleave(torch.arange(len(weights)), sizes)


def reference(weights, erase, guide, n, retain, invariants, tau=TAU, alpha=1.0, mu=0.0, scalars=None,
              directions=None, use_filter=True):
    """Edited weights, per layer, written straight from the formula; also the filter's and copies' decisions, the
    null-space dimensions and the smallest distance of an eigenvalue to the threshold."""
    eye = torch.eye(D, dtype=F64)
    s_tt = erase.T @ erase / n
    s_at = guide.T @ erase / n
    k = invariants.T  # d×k
    edited, token_masks, copy_masks, margins, null_dims = [], [], [], [], []
    for layer, w in enumerate(weights):
        if scalars is None:
            rows = retain
        else:
            e = w @ (s_at - s_tt) @ torch.linalg.inv(eye + s_tt)
            norms = torch.stack([torch.linalg.norm(e @ r) for r in retain])
            keep = norms > norms.mean() if use_filter else torch.ones(len(retain), dtype=torch.bool)
            rows, copy_mask = [retain[keep]], torch.zeros(scalars.shape[1:], dtype=torch.bool)
            for j in range(len(retain)):
                if not keep[j]:
                    continue
                copies = torch.stack([retain[j] + s * directions[layer] for s in scalars[layer, j]])
                copy_norms = torch.stack([torch.linalg.norm(e @ c) for c in copies])
                copy_mask[j] = copy_norms > copy_norms.mean()
                rows.append(copies[copy_mask[j]])
            rows = torch.cat(rows)
            token_masks.append(keep)
            copy_masks.append(copy_mask)
        sigma = rows.T @ rows / rows.shape[0]
        values, vectors = torch.linalg.eigh(sigma)
        margins.append(float((values - tau).abs().min()))
        null = vectors[:, values < tau]
        null_dims.append(null.shape[1])
        p = null @ null.T
        m = torch.linalg.inv(s_tt @ p + alpha * eye)
        inner = eye - m @ k @ torch.linalg.inv(k.T @ p @ m @ k + mu * torch.eye(k.shape[1], dtype=F64)) @ k.T @ p
        edited.append(w + w @ (s_at - s_tt) @ p @ inner @ m)
    return SimpleNamespace(edited=edited, token_masks=token_masks, copy_masks=copy_masks, null_dims=null_dims,
                           margin=min(margins))


def rel(a, b):
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def package_edited(weights, update):
    w_all, row_layer = stacked(weights)
    return list(apply_update(w_all, row_layer, update).split([w.shape[0] for w in weights]))


def refined(weights, erase, guide, retain, invariants, **kwargs):
    w_all, row_layer = stacked(weights)
    kwargs.setdefault("augment", 10)
    return speed_update(erase, guide, NUM_CONCEPTS, retain, invariants, weights=w_all, row_layer=row_layer,
                        num_layers=len(weights), **kwargs)


def test_without_refinement_matches_the_formula():
    weights, erase, guide, retain, invariants = make_problem()
    update = speed_update(erase, guide, NUM_CONCEPTS, retain, invariants, augment=0, retain_scale=0.5)
    assert isinstance(update, SpeedUpdate)
    assert update.down.shape == (1, 6, D) and update.retain_kept is None
    assert update.null_dim.tolist() == [D - 8]
    ref = reference(weights, erase, guide, NUM_CONCEPTS, retain, invariants, alpha=0.5)
    assert ref.margin > 1e-3  # no eigenvalue sits on the threshold
    for w, got, want in zip(weights, package_edited(weights, update), ref.edited):
        assert rel(got, want) < 1e-9
        assert rel(got - w, want - w) < 1e-6  # relative to the update itself
        assert torch.allclose(w + w @ update.dense(), want, rtol=0, atol=1e-10)


def test_update_is_in_the_null_space_of_the_retain_set():
    _, erase, guide, retain, invariants = make_problem()
    update = speed_update(erase, guide, NUM_CONCEPTS, retain, invariants, augment=0)
    x = update.dense()
    assert float(torch.linalg.norm(retain @ x.T)) < 1e-8 * float(torch.linalg.norm(retain))  # X P = X: X r = 0
    basis = retain_directions(retain, TAU)
    assert basis.shape == (D, 8)
    assert torch.allclose(basis.T @ basis, torch.eye(8, dtype=F64), atol=1e-12)
    values, vectors = torch.linalg.eigh(retain.T @ retain / retain.shape[0])
    used = vectors[:, values >= TAU]
    assert torch.allclose(basis @ basis.T, used @ used.T, atol=1e-10)


@pytest.mark.parametrize("augment", [0, 10])
def test_invariant_tokens_are_kept_exactly_with_zero_mu(augment):
    weights, erase, guide, retain, invariants = make_problem()
    exact = refined(weights, erase, guide, retain, invariants, augment=augment)
    relaxed = refined(weights, erase, guide, retain, invariants, augment=augment, invariant_lamb=1.0)
    free = refined(weights, erase, guide, retain, None, augment=augment)
    for w, got, soft, unconstrained in zip(weights, package_edited(weights, exact), package_edited(weights, relaxed),
                                           package_edited(weights, free)):
        assert rel(got @ invariants.T, w @ invariants.T) < 1e-6
        assert rel(soft @ invariants.T, w @ invariants.T) > 1e-4
        assert rel(unconstrained @ invariants.T, w @ invariants.T) > 1e-4


def test_refinement_matches_the_formula_given_the_same_draws():
    weights, erase, guide, retain, invariants = make_problem()
    update = refined(weights, erase, guide, retain, invariants, seed=7, retain_scale=0.3)
    drawn = torch.randn(len(weights), retain.shape[0], 10, generator=torch.Generator().manual_seed(7), dtype=F64)
    assert torch.equal(update.scalars, drawn)
    directions = smallest_right_singular_vectors(weights)
    ref = reference(weights, erase, guide, NUM_CONCEPTS, retain, invariants, alpha=0.3, scalars=drawn,
                    directions=directions)
    assert ref.margin > 1e-3
    assert update.down.shape == (len(weights), 6, D)
    assert torch.equal(update.retain_kept, torch.stack(ref.token_masks))
    assert torch.equal(update.copies_kept, torch.stack(ref.copy_masks))
    for layer, (w, got, want) in enumerate(zip(weights, package_edited(weights, update), ref.edited)):
        assert rel(got - w, want - w) < 1e-6
        assert torch.allclose(w + w @ update.dense(layer), want, rtol=0, atol=1e-10)
    # the refinement really differs per layer and from the plain solve
    assert rel(update.down[0], update.down[1]) > 1e-3
    assert update.null_dim.tolist() == ref.null_dims
    assert all(D - 9 <= k <= D - 8 for k in ref.null_dims)  # 8 retain directions (+ v_ℓ)


def test_filter_keeps_exactly_the_tokens_above_the_mean():
    weights, erase, guide, retain, invariants = make_problem()
    update = refined(weights, erase, guide, retain, invariants)
    s_tt, s_at = erase.T @ erase / NUM_CONCEPTS, guide.T @ erase / NUM_CONCEPTS
    for layer, w in enumerate(weights):
        e = w @ (s_at - s_tt) @ torch.linalg.inv(torch.eye(D, dtype=F64) + s_tt)
        norms = (retain @ e.T).norm(dim=1)
        assert torch.equal(update.retain_kept[layer], norms > norms.mean())
        assert 0 < int(update.num_retain_kept[layer]) < retain.shape[0]
        assert not update.copies_kept[layer][~update.retain_kept[layer]].any()  # only kept tokens are augmented


def test_without_filter_every_token_is_kept_and_augmented():
    weights, erase, guide, retain, invariants = make_problem()
    update = refined(weights, erase, guide, retain, invariants, filter=False, seed=3)
    assert bool(update.retain_kept.all())
    assert bool(update.copies_kept.any(-1).all())  # every token has copies above its batch mean
    ref = reference(weights, erase, guide, NUM_CONCEPTS, retain, invariants, scalars=update.scalars,
                    directions=smallest_right_singular_vectors(weights), use_filter=False)
    assert ref.margin > 1e-3
    assert torch.equal(update.copies_kept, torch.stack(ref.copy_masks))
    for w, got, want in zip(weights, package_edited(weights, update), ref.edited):
        assert rel(got - w, want - w) < 1e-6


def test_augmentation_is_deterministic_and_only_along_the_weakest_direction():
    weights, erase, guide, retain, invariants = make_problem()
    first = refined(weights, erase, guide, retain, invariants, seed=1)
    again = refined(weights, erase, guide, retain, invariants, seed=1)
    other = refined(weights, erase, guide, retain, invariants, seed=2)
    assert torch.equal(first.down, again.down) and torch.equal(first.copies_kept, again.copies_kept)
    assert not torch.equal(first.scalars, other.scalars)
    assert not torch.equal(first.down, other.down)
    directions = smallest_right_singular_vectors(weights)
    copies = augmented_copies(retain, directions, first.scalars)
    assert copies.shape == (len(weights), retain.shape[0], 10, D)
    step = copies - retain[None, :, None]
    along = (step * directions[:, None, None]).sum(-1)
    assert torch.allclose(along, first.scalars, atol=1e-12)
    assert float((step - along[..., None] * directions[:, None, None]).abs().max()) < 1e-12
    assert torch.equal(augmentation_scalars(len(weights), retain.shape[0], 10, seed=1), first.scalars)


def test_smallest_right_singular_vectors():
    weights, *_ = make_problem()
    got = smallest_right_singular_vectors(weights)
    w_all, row_layer = stacked(weights)
    perm = torch.randperm(w_all.shape[0], generator=torch.Generator().manual_seed(0))  # rows in any order
    assert torch.allclose(smallest_right_singular_vectors(w_all[perm], row_layer[perm], len(weights)), got, atol=1e-12)
    for v, w in zip(got, weights):
        _, s, vh = torch.linalg.svd(w, full_matrices=False)
        assert abs(abs(float(v @ vh[-1])) - 1) < 1e-9
        assert abs(float(torch.linalg.norm(w @ v)) - float(s[-1])) < 1e-9
        assert float(v[v.abs().argmax()]) > 0  # sign fixed
    assert torch.equal(got, smallest_right_singular_vectors([w.clone() for w in weights]))


def test_apply_update_with_interleaved_rows_and_float32():
    weights, erase, guide, retain, invariants = make_problem()
    update = refined(weights, erase, guide, retain, invariants)
    w_all, row_layer = stacked(weights)
    perm = torch.randperm(w_all.shape[0], generator=torch.Generator().manual_seed(1))
    out = apply_update(w_all[perm], row_layer[perm], update, scale=0.5)
    want = torch.cat([w + 0.5 * w @ update.dense(i) for i, w in enumerate(weights)])[perm]
    assert torch.allclose(out, want, rtol=0, atol=1e-12)
    out32 = apply_update(w_all.float(), row_layer, update)
    assert out32.dtype == torch.float32
    assert torch.allclose(out32.double(), torch.cat(package_edited(weights, update)), atol=1e-5)


def test_default_invariants_are_the_start_token_and_cluster_centres():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, D, generator=g, dtype=F64) * 10
    labels = torch.arange(76) % 3
    noise = torch.randn(77, D, generator=g, dtype=F64)
    states = torch.cat([noise[:1], centres[labels] + noise[1:] * 0.1])
    got = default_invariants(states)
    assert got.shape == (4, D) and got.dtype == F64
    assert torch.equal(got[0], states[0])
    assert torch.equal(got, default_invariants(states[None]))
    assert torch.equal(got, default_invariants(states, seed=0))
    means = torch.stack([states[1:][labels == c].mean(0) for c in range(3)])
    match = torch.cdist(got[1:], means).argmin(1)
    assert sorted(match.tolist()) == [0, 1, 2]
    assert torch.allclose(got[1:], means[match], atol=1e-12)
    assert default_invariants(states, num_centres=0).shape == (1, D)
    # Lloyd's fixed point on unstructured data: every centre is the mean of the points nearest to it
    points = torch.randn(40, D, generator=g, dtype=F64)
    c = kmeans(points, 4, seed=5)
    assign = torch.cdist(points, c).argmin(1)
    for j in range(4):
        assert torch.allclose(c[j], points[assign == j].mean(0), atol=1e-12)
    assert torch.equal(c, kmeans(points, 4, seed=5))
    with pytest.raises(ValueError, match="num_centres"):
        kmeans(points, 41)


@pytest.mark.parametrize(
    "option, value",
    [("threshold", 0.0), ("threshold", -1.0), ("threshold", float("nan")), ("threshold", float("inf")),
     ("retain_scale", 0.0), ("retain_scale", float("nan")), ("invariant_lamb", -0.1),
     ("invariant_lamb", float("inf")), ("augment", -1), ("augment", 1.5), ("augment", True)],
)
def test_bad_options_raise(option, value):
    weights, erase, guide, retain, invariants = make_problem()
    with pytest.raises(ValueError, match=option):
        refined(weights, erase, guide, retain, invariants, **{option: value})


def test_bad_tokens_raise():
    _, erase, guide, retain, invariants = make_problem()
    with pytest.raises(ValueError, match="invariants"):
        speed_update(erase, guide, NUM_CONCEPTS, retain, invariants[:, :-1], augment=0)
    with pytest.raises(ValueError, match="retain"):
        speed_update(erase, guide, NUM_CONCEPTS, retain[:0], invariants, augment=0)
    with pytest.raises(ValueError, match="num_concepts"):
        speed_update(erase, guide, 0, retain, invariants, augment=0)
    with pytest.raises(ValueError, match="weights"):
        speed_update(erase, guide, NUM_CONCEPTS, retain, invariants, augment=5)


def test_invariants_inside_the_retained_directions_or_repeated_are_kept_exactly():
    _, erase, guide, retain, invariants = make_problem()
    inside = torch.cat([retain[:2], invariants[:1], invariants[:1], invariants[1:] + retain[2:4]])  # P k = 0, repeats
    update = speed_update(erase, guide, NUM_CONCEPTS, retain, inside, augment=0)
    assert float((update.down[0] @ inside.T).abs().max()) < 1e-10 * float(update.down.abs().max())
    alone = speed_update(erase, guide, NUM_CONCEPTS, retain, invariants, augment=0)
    assert torch.allclose(update.down, alone.down, rtol=0, atol=1e-10 * float(alone.down.abs().max()))
    update = speed_update(erase, guide, NUM_CONCEPTS, retain, inside, augment=0, invariant_lamb=0.1)
    assert bool(torch.isfinite(update.down).all())


@pytest.mark.parametrize("augment", [0, 4])
def test_empty_null_space_asks_for_a_larger_threshold(augment):
    weights, erase, guide, _, invariants = make_problem()
    retain = torch.randn(200, D, generator=torch.Generator().manual_seed(9), dtype=F64) * 5  # uses every direction
    with pytest.raises(ValueError, match="larger threshold"):
        refined(weights, erase, guide, retain, invariants, augment=augment, filter=False)


def test_drop_erased_matches_whole_words_of_any_erased_concept():
    retain = ["A Van Gogh painting", "vangogh", "monet's garden", "c++ code", "monet", "a c++ manual", "Picasso."]
    kept, dropped = drop_erased(retain, ["van gogh", "", "c++", "PICASSO"])
    assert dropped == ["A Van Gogh painting", "c++ code", "a c++ manual", "Picasso."]
    assert kept == ["vangogh", "monet's garden", "monet"]
    assert drop_erased(retain, []) == (retain, []) and drop_erased(retain, [""]) == (retain, [])

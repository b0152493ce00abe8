"""`method="speed"` on tiny pipelines of every family, against a plain float64 transcription of the SPEED formula."""

import pytest
import torch

import diffusers_uce
from diffusers_uce.demo import make_demo_pipeline
from tests.support.helpers import rel, target_layers, unet_output, weights
from tests.support.reference import full_states, groups

F64 = torch.float64
ERASE, GUIDE = ["Van Gogh", "Picasso"], ["art", ""]
RETAIN = ["Monet", "a red car", "Rembrandt"]
INVARIANT_PROMPTS = ["a dog"]


def pipe64(family):
    return diffusers_uce.attach(make_demo_pipeline(family, torch_dtype=F64))


def reference_thresholds(pipe):
    """Half the smallest non-zero eigenvalue of each group's retain covariance (last tokens): a τ far from every
    eigenvalue, so the transcription and the package agree on the null space."""
    taus = []
    for _, encode in groups(pipe):
        states = full_states(pipe, RETAIN, encode)
        r = torch.stack([s[k] for s, k in states.values()])
        values = torch.linalg.eigvalsh(r.T @ r / len(r))
        taus.append(float(values[values > 1e-8 * values.max()].min()) / 2)
    return min(taus)


def reference_delta(w, erase, guide, n, retain, invariants, tau, alpha, mu):
    """ΔW = W (S_at − S_tt) P (I − M K (Kᵀ P M K + μI)⁻¹ Kᵀ P) M, every matrix explicit (K: d×k)."""
    d = erase.shape[1]
    eye = torch.eye(d, dtype=F64)
    s_tt, s_at = erase.T @ erase / n, guide.T @ erase / n
    values, vectors = torch.linalg.eigh(retain.T @ retain / len(retain))
    null = vectors[:, values < tau]
    p = null @ null.T
    m = torch.linalg.inv(s_tt @ p + alpha * eye)
    k = invariants.T
    k = k[:, (p @ k).norm(dim=0) > 1e-9 * k.norm(dim=0)]  # a token the retain set uses (P k = 0) is kept anyway
    if k.shape[1] == 0:
        return w @ (s_at - s_tt) @ p @ m
    inner = torch.linalg.inv(k.T @ p @ m @ k + mu * torch.eye(k.shape[1], dtype=F64))
    return w @ (s_at - s_tt) @ p @ (eye - m @ k @ inner @ k.T @ p) @ m


@pytest.mark.parametrize("alpha", [1.0, 0.05])
def test_update_matches_the_float64_formula(family, alpha):
    pipe = pipe64(family)
    tau = reference_thresholds(pipe)
    before = weights(pipe)
    biases = {n: None if m.bias is None else m.bias.detach().clone() for n, m in target_layers(pipe)}
    pipe.apply_concept_edits(erase=ERASE, guide=GUIDE, preserve=RETAIN, method="speed", method_options=dict(
        threshold=tau, retain_scale=alpha, augment=0, invariants=INVARIANT_PROMPTS))
    pipe.fuse_concept_edits()
    after = weights(pipe)
    for names, encode in groups(pipe):
        states = full_states(pipe, ERASE + GUIDE + RETAIN + INVARIANT_PROMPTS, encode)
        erase = torch.stack([states[e][0][states[e][1]] for e in ERASE])
        guide = torch.stack([states[g][0][states[g][1]] for g in GUIDE])
        retain = torch.stack([states[r][0][states[r][1]] for r in RETAIN])
        invariants = torch.cat([states[p][0][: states[p][1] + 1] for p in INVARIANT_PROMPTS])
        for name in names:
            expected = before[name] + reference_delta(before[name], erase, guide, len(ERASE), retain, invariants,
                                                      tau, alpha, 0.0)
            assert rel(after[name] - before[name], expected - before[name]) < 1e-6, name
            module = dict(target_layers(pipe))[name]
            if biases[name] is not None:  # the bias is left as it is
                assert torch.equal(module.bias, biases[name])


def test_invariant_tokens_are_kept_exactly_with_refinement(family):
    pipe = pipe64(family)
    before = weights(pipe)
    out = pipe.apply_concept_edits(erase=ERASE, guide=GUIDE, preserve=RETAIN, method="speed",
                                   method_options=dict(threshold=1e-3, seed=3))
    assert len(out.report.invariants) >= 4 and out.report.summary()["max_invariant_change"] < 1e-6
    pipe.fuse_concept_edits()
    after = weights(pipe)
    moved = False
    for names, encode in groups(pipe):
        states = full_states(pipe, [""], encode)[""][0]
        from diffusers_uce.core.precise import default_invariants

        k = default_invariants(states, num_centres=min(3, states.shape[0] - 1))
        for name in names:
            assert rel(after[name] @ k.T, before[name] @ k.T) < 1e-6, name  # W'K = WK (so W'K + b = WK + b)
            moved |= rel(after[name], before[name]) > 1e-4
    assert moved


def test_processor_strength_fuse_unload(family):
    pipe = diffusers_uce.attach(make_demo_pipeline(family))
    original, base = unet_output(pipe), weights(pipe)
    pipe.apply_concept_edits(erase=ERASE, guide=GUIDE, preserve=RETAIN, method="speed",
                             method_options=dict(threshold=1e-3))
    edited = unet_output(pipe)
    assert rel(edited, original) > 1e-4
    pipe.fuse_concept_edits()
    assert rel(unet_output(pipe), edited) < 1e-4
    full = weights(pipe)
    pipe.set_concept_edit_scale(0.5)
    half = weights(pipe)
    for name in base:
        assert rel(half[name] - base[name], 0.5 * (full[name] - base[name])) < 1e-5
    pipe.unfuse_concept_edits()
    assert rel(unet_output(pipe), original) > 1e-5
    pipe.set_concept_edit_scale(0.0)
    assert rel(unet_output(pipe), original) < 1e-6
    pipe.unload_concept_edits()
    assert all(torch.equal(w, base[n]) for n, w in weights(pipe).items())


def test_calls_are_solved_jointly(family):
    options = dict(threshold=1e-3, seed=1)
    one = diffusers_uce.attach(make_demo_pipeline(family))
    one.apply_concept_edits(erase=ERASE[:1], guide=GUIDE[:1], preserve=RETAIN[:2], method="speed",
                            method_options=options)
    one.apply_concept_edits(erase=ERASE[1:], guide=GUIDE[1:], preserve=RETAIN[2:], method="speed",
                            method_options=options)
    both = diffusers_uce.attach(make_demo_pipeline(family))
    both.apply_concept_edits(erase=ERASE, guide=GUIDE, preserve=RETAIN, method="speed", method_options=options)
    assert [r.method for r in one.concept_edits] == ["speed", "speed"]
    one.fuse_concept_edits()
    both.fuse_concept_edits()
    a, b = weights(one), weights(both)
    assert all(rel(a[n], b[n]) < 1e-6 for n in a)


def test_augmentation_is_deterministic_per_seed():
    def edited(seed):
        pipe = diffusers_uce.attach(make_demo_pipeline("sd1"))
        pipe.apply_concept_edits(erase=ERASE, guide=GUIDE, preserve=RETAIN, method="speed",
                                 method_options=dict(threshold=1e-3, seed=seed, filter=False))
        pipe.fuse_concept_edits()
        return weights(pipe)

    a, b = edited(0), edited(0)  # (that other seeds draw other copies is pinned in tests/core/test_precise.py)
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_retain_sets_and_dropping():
    artists = diffusers_uce.retain_set("artists")
    assert len(artists) == 1734 and artists[0] == "A.J.Casson"
    assert len(diffusers_uce.retain_set("celebrities")) == 100
    assert len(diffusers_uce.retain_set("instances")) > 1000
    with pytest.raises(ValueError, match="unknown retain set"):
        diffusers_uce.retain_set("painters")
    pipe = diffusers_uce.attach(make_demo_pipeline("sd1"))
    out = pipe.apply_concept_edits(erase=["Van Gogh"], guide="art", method="speed",
                                   preserve=["Monet", "a van gogh painting", "Van Goghism"],
                                   method_options=dict(threshold=1e-3))
    assert out.report.retain_dropped == ["a van gogh painting"]
    assert [r["concept"] for r in out.report.preserved] == ["Monet", "Van Goghism"]
    assert "1 retain prompt(s) dropped" in str(out.report)


def test_record_round_trip_with_tensor_invariants():
    from diffusers_uce.core.edits import ConceptEdit

    pipe = diffusers_uce.attach(make_demo_pipeline("sd1"))
    tokens = torch.randn(2, 32, dtype=F64)
    out = pipe.apply_concept_edits(erase=ERASE, guide=GUIDE, preserve=RETAIN, method="speed",
                                   method_options=dict(threshold=1e-3, invariants=tokens, augment=2))
    record = out.edits[-1]
    assert record.method == "speed" and record.method_options["augment"] == 2
    assert torch.equal(torch.tensor(record.method_options["invariants"], dtype=F64), tokens)
    assert ConceptEdit.from_dict(record.to_dict()) == record
    assert len(out.report.invariants) == 2 and out.report.summary()["max_invariant_change"] < 1e-5


@pytest.mark.parametrize("kwargs, match", [
    (dict(method="fast"), "unknown method"),
    (dict(method="speed", method_options={"tau": 0.1}), "unknown method_options"),
    (dict(method_options={"threshold": 0.1}), "takes no method_options"),
    (dict(method="speed", method_options={"threshold": float("nan")}), "threshold"),
    (dict(method="speed", method_options={"threshold": 0}), "threshold"),
    (dict(method="speed", method_options={"retain_scale": -1.0}), "retain_scale"),
    (dict(method="speed", method_options={"retain_scale": float("inf")}), "retain_scale"),
    (dict(method="speed", method_options={"augment": -1}), "augment"),
    (dict(method="speed", method_options={"invariants": torch.zeros(2, 5)}), "width"),
    (dict(method="speed", method_options={"invariants": "none"}), "invariants"),
    (dict(method="speed", preserve=["Van Gogh at night"]), "retain set is empty"),
    (dict(method="speed", lamb=0.1), "lamb"),
    (dict(method="speed", technique="tensor"), "technique"),
])
def test_bad_input_raises_before_anything_changes(kwargs, match):
    pipe = diffusers_uce.attach(make_demo_pipeline("sd1"))
    before, output = weights(pipe), unet_output(pipe)
    if kwargs.get("method") == "speed":
        kwargs["method_options"] = {"threshold": 1e-3, **kwargs.get("method_options", {})}
    with pytest.raises(ValueError, match=match):
        pipe.apply_concept_edits(erase=["Van Gogh"], guide="art", **kwargs)
    assert pipe.concept_edits == ()
    assert all(torch.equal(w, before[n]) for n, w in weights(pipe).items())
    assert torch.equal(unet_output(pipe), output)


def test_methods_and_options_cannot_mix():
    pipe = diffusers_uce.attach(make_demo_pipeline("sd1"))
    pipe.apply_concept_edits(erase=["Monet"], guide="art")
    with pytest.raises(ValueError, match="one method"):
        pipe.apply_concept_edits(erase=["Van Gogh"], guide="art", method="speed")
    pipe.unload_concept_edits()
    pipe.apply_concept_edits(erase=["Monet"], guide="art", method="speed", method_options=dict(threshold=1e-3))
    with pytest.raises(ValueError, match="one method"):
        pipe.apply_concept_edits(erase=["Van Gogh"], guide="art")
    with pytest.raises(ValueError, match="one set of options"):
        pipe.apply_concept_edits(erase=["Van Gogh"], guide="art", method="speed", method_options=dict(threshold=0.2))


def test_edit_file_round_trip_and_older_versions_load(family, tmp_path):
    import json

    import safetensors

    pipe = diffusers_uce.attach(make_demo_pipeline(family))
    pipe.apply_concept_edits(erase=ERASE, guide=GUIDE, preserve=RETAIN, method="speed",
                             method_options=dict(threshold=1e-3))
    pipe.set_concept_edit_scale(0.7)
    expected = unet_output(pipe)
    path = pipe.save_concept_edits(tmp_path)
    with safetensors.safe_open(path, framework="pt") as f:
        info, keys = json.loads(f.metadata()["uce"]), set(f.keys())
    assert info["format_version"] == 3 and info["edits"][0]["method"] == "speed"
    assert all(".layerwise." in k for k in keys)
    loaded = diffusers_uce.attach(make_demo_pipeline(family))
    loaded.load_concept_edits(tmp_path)
    assert loaded.concept_edits == pipe.concept_edits and loaded.concept_edit_scale == 0.7
    assert rel(unet_output(loaded), expected) < 1e-5
    loaded.apply_concept_edits(erase=["Monet"], guide="art", method="speed", method_options=dict(threshold=1e-3))
    assert len(loaded.concept_edits) == 2


def test_lora_export_is_exact(family, tmp_path):
    pytest.importorskip("peft")
    import safetensors

    pipe = diffusers_uce.attach(make_demo_pipeline(family))
    pipe.apply_concept_edits(erase=ERASE, guide=GUIDE, preserve=RETAIN, method="speed",
                             method_options=dict(threshold=1e-3))
    assert pipe.save_concept_edits_as_lora(tmp_path) < 1e-6
    with safetensors.safe_open(str(tmp_path / "pytorch_lora_weights.safetensors"), framework="pt") as f:
        ranks = {f.get_tensor(k).shape[0] for k in f.keys() if "lora_A" in k}
    assert ranks == {len(ERASE)}  # one erased token per concept
    pipe.fuse_concept_edits()
    expected = unet_output(pipe)
    plain = make_demo_pipeline(family)
    plain.load_lora_weights(tmp_path)
    assert rel(unet_output(plain), expected) < 1e-4
    assert pipe.save_concept_edits_as_lora(tmp_path / "r1", rank=1) > 0


def test_nudity_and_the_empty_retain_set_use_every_position(family):
    """Erasing exactly "nudity" pairs its positions 1… with the guide's; a retain set of just "" uses its positions
    1…; automatic invariants: the start token and k-means centres of the other states of "" (which lie in the
    retained directions here, so only the start token constrains the update)."""
    pipe = pipe64(family)
    taus = []
    for _, encode in groups(pipe):  # τ in the widest gap of the spectrum: a null space the erased tokens reach
        states, _ = full_states(pipe, [""], encode)[""]
        r = states[1:] if len(states) > 1 else states
        values = torch.linalg.eigvalsh(r.T @ r / len(r))
        values = values[values > 1e-6 * values.max()]
        gap = int((values[1:] / values[:-1]).argmax()) if len(values) > 1 else -1
        taus.append(float((values[gap] * values[gap + 1]).sqrt()) if gap >= 0 else float(values[0]) / 2)
    tau = taus[0]  # one threshold for every group (FLUX's pooled group has a single retain token: any τ below it)
    before = weights(pipe)
    # FLUX's tiny T5 gives (almost) identical padding states, whose k-means centres nearly repeat: an explicit inverse
    # in the transcription would be meaningless, so there the invariant is the start token alone
    options = dict(threshold=tau, augment=0, invariants=[""] if family == "flux" else "auto")
    pipe.apply_concept_edits(erase=["nudity"], guide="", method="speed", method_options=options)
    pipe.fuse_concept_edits()
    after = weights(pipe)
    from diffusers_uce.core.precise import default_invariants

    for names, encode in groups(pipe):
        states = full_states(pipe, ["nudity", ""], encode)
        (nude, _), (empty, _) = states["nudity"], states[""]
        rows = slice(1, None) if len(empty) > 1 else slice(0, 1)
        erase, guide, retain = nude[rows], empty[rows], empty[rows]
        invariants = empty[:1] if family == "flux" else default_invariants(empty, num_centres=min(3, len(empty) - 1))
        for name in names:
            expected = reference_delta(before[name], erase, guide, 1, retain, invariants, tau, 1.0, 0.0)
            assert rel(after[name] - before[name], expected) < 1e-6, name


def test_format_2_files_still_load(tmp_path):
    import json

    import safetensors
    import safetensors.torch

    pipe = diffusers_uce.attach(make_demo_pipeline("sd1"))
    pipe.apply_concept_edits(erase=ERASE, guide="art", preserve=RETAIN)
    expected = unet_output(pipe)
    path = pipe.save_concept_edits(tmp_path)
    with safetensors.safe_open(path, framework="pt") as f:
        info, tensors = json.loads(f.metadata()["uce"]), {k: f.get_tensor(k) for k in f.keys()}
    info["format_version"] = 2  # what version 2 wrote: records without a method
    for record in info["edits"]:
        del record["method"], record["method_options"]
    safetensors.torch.save_file(tensors, path, metadata={"format": "pt", "uce": json.dumps(info)})
    loaded = diffusers_uce.attach(make_demo_pipeline("sd1"))
    loaded.load_concept_edits(tmp_path)
    assert loaded.concept_edits == pipe.concept_edits and loaded.concept_edits[0].method == "uce"
    assert rel(unet_output(loaded), expected) < 1e-6

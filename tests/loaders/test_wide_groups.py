"""Wide groups solved in low-rank form (FLUX.2's 15,360-wide input, HiDream's per-layer groups), run on the demo
pipelines with the width thresholds lowered: the same edit as the dense solve, everywhere the edit is used."""

import json

import pytest
import torch
from safetensors.torch import save_file

import diffusers_uce
from diffusers_uce.core import wide
from diffusers_uce.demo import make_demo_pipeline
from diffusers_uce.loaders.edit_format import FORMAT_VERSION, read_edit_file
from tests.support.helpers import rel, target_layers, weights

ERASE = ["van gogh", "picasso"]
PRESERVE = ["monet"]


@pytest.fixture(params=["flux2", "hidream"])
def family(request):
    return request.param


@pytest.fixture
def low_rank(monkeypatch):
    monkeypatch.setattr(wide, "LOW_RANK_MIN_WIDTH", 0)
    monkeypatch.setattr(wide, "LOW_RANK_MIN_WIDTH_PER_LAYER", 0)


def latents(pipe):
    out = pipe(prompt="a painting by van gogh", num_inference_steps=2, output_type="latent",
               generator=torch.Generator().manual_seed(0))
    return out.images.double()


def dense_fused(family, **kwargs):
    dense = diffusers_uce.attach(make_demo_pipeline(family))
    dense.apply_concept_edits(ERASE, guide="art", preserve=PRESERVE, **kwargs)
    assert all(g.solution.transform is not None for g in dense._uce_state.groups)  # (the thresholds are not low)
    dense.fuse_concept_edits()
    return weights(dense)


@pytest.mark.parametrize("technique", ["replace", "tensor"])
def test_low_rank_fuses_like_dense(family, technique, monkeypatch):
    expected = dense_fused(family, technique=technique)
    monkeypatch.setattr(wide, "LOW_RANK_MIN_WIDTH", 0)
    monkeypatch.setattr(wide, "LOW_RANK_MIN_WIDTH_PER_LAYER", 0)
    pipe = diffusers_uce.attach(make_demo_pipeline(family))
    out = pipe.apply_concept_edits(ERASE, guide="art", preserve=PRESERVE, technique=technique)
    groups = pipe._uce_state.groups
    assert all(g.solution.transform is None and g.solution.layerwise is not None for g in groups)
    assert all(r["efficacy"] > 0 for r in out.report.erased)
    pipe.fuse_concept_edits()
    for name, module in target_layers(pipe):
        assert rel(module.weight, expected[name]) < 1e-6, name


def test_report_equals_dense(family, monkeypatch):
    dense = diffusers_uce.attach(make_demo_pipeline(family))
    expected = dense.apply_concept_edits(ERASE, guide="art", preserve=PRESERVE, held_out=["a dog"]).report
    monkeypatch.setattr(wide, "LOW_RANK_MIN_WIDTH", 0)
    monkeypatch.setattr(wide, "LOW_RANK_MIN_WIDTH_PER_LAYER", 0)
    pipe = diffusers_uce.attach(make_demo_pipeline(family))
    report = pipe.apply_concept_edits(ERASE, guide="art", preserve=PRESERVE, held_out=["a dog"]).report
    for key in ("erased", "preserved", "held_out"):
        for a, b in zip(getattr(report, key), getattr(expected, key)):
            value = "efficacy" if key == "erased" else "interference"
            assert a[value] == pytest.approx(b[value], rel=1e-6, abs=1e-9), (key, a, b)


def test_processor_equals_fused_and_unload_is_exact(family, low_rank):
    pipe = diffusers_uce.attach(make_demo_pipeline(family))
    original = weights(pipe)
    before = latents(pipe)
    pipe.apply_concept_edits(ERASE, guide="art", preserve=PRESERVE)
    hooked = latents(pipe)
    assert rel(hooked, before) > 1e-6
    pipe.set_concept_edit_scale(0.5)
    half = latents(pipe)
    pipe.fuse_concept_edits()
    assert rel(latents(pipe), half) < 1e-4  # strength scales the factors
    pipe.unfuse_concept_edits()
    pipe.set_concept_edit_scale(1.0)
    pipe.fuse_concept_edits()
    assert rel(latents(pipe), hooked) < 1e-4
    pipe.unload_concept_edits()
    assert all(torch.equal(module.weight, original[name]) for name, module in target_layers(pipe))
    assert torch.equal(latents(pipe), before)


def test_edit_file_stores_the_factors_and_round_trips(family, low_rank, tmp_path):
    pipe = diffusers_uce.attach(make_demo_pipeline(family))
    pipe.apply_concept_edits(ERASE, guide="art", preserve=PRESERVE, adapter_name="artists")
    pipe.save_concept_edits(tmp_path / "edit")
    info, tensors = read_edit_file(next((tmp_path / "edit").glob("*.safetensors")))
    assert info["format_version"] == FORMAT_VERSION == 4
    assert not any(k.endswith(".transform") for k in tensors) and any(k.endswith(".layerwise.up") for k in tensors)
    pipe.fuse_concept_edits()
    other = diffusers_uce.attach(make_demo_pipeline(family))
    other.load_concept_edits(tmp_path / "edit")  # verified: solved again from its records
    assert other.get_concept_edit_names() == ["artists"]
    other.fuse_concept_edits()
    for (name, a), (_, b) in zip(target_layers(pipe), target_layers(other)):
        assert rel(b.weight, a.weight) < 1e-6, name
    tensors = {k: (v * 2 if k.endswith(".layerwise.up") else v) for k, v in tensors.items()}
    path = next((tmp_path / "edit").glob("*.safetensors"))
    save_file(tensors, str(path), metadata={"uce": json.dumps(info)})
    third = diffusers_uce.attach(make_demo_pipeline(family))
    with pytest.raises(ValueError, match="does not perform the edits it records"):
        third.load_concept_edits(tmp_path / "edit")


def test_lora_export_is_exact(family, low_rank, tmp_path):
    pipe = diffusers_uce.attach(make_demo_pipeline(family))
    pipe.apply_concept_edits(ERASE, guide="art", preserve=PRESERVE)
    assert pipe.save_concept_edits_as_lora(tmp_path) < 1e-8
    plain = make_demo_pipeline(family)  # no plugin: the pipeline's own LoRA loader
    plain.load_lora_weights(tmp_path)
    pipe.fuse_concept_edits()
    assert rel(latents(plain), latents(pipe)) < 1e-4


@pytest.mark.parametrize("kwargs,match", [({"harden": True}, "hardening"), ({"method": "speed"}, "precise erasure")])
def test_refused_on_wide_groups_before_anything_changes(family, low_rank, kwargs, match):
    pipe = diffusers_uce.attach(make_demo_pipeline(family))
    original = weights(pipe)
    with pytest.raises(ValueError, match=f"{match}.*d×d"):
        pipe.apply_concept_edits(ERASE, guide="art", **kwargs)
    assert pipe._uce_state is None or not pipe._uce_state.records
    assert all(torch.equal(module.weight, original[name]) for name, module in target_layers(pipe))


def test_adversarial_embeds_refused(low_rank):
    pipe = diffusers_uce.attach(make_demo_pipeline("flux2"))
    pipe.apply_concept_edits(ERASE[:1], guide="art")
    with pytest.raises(ValueError, match="low-rank form"):
        pipe.adversarial_embeds("van gogh")

"""Hardened edits (`apply_concept_edits(harden=...)`): the float64 transcription of UCE then RECE rounds, replay on
later solves, every way an edit leaves the pipeline, the robustness report and the closed-form attack.

Every test taking `family`/`pipe` runs on each pipeline family (SD 1.x, SD 2.x, SDXL, FLUX).
"""

import json
import math
import re

import pytest
import torch

import diffusers_uce
from diffusers_uce.core.edits import ConceptEdit, concept_edit_request
from diffusers_uce.core.hardening import HardenOptions
from diffusers_uce.demo import make_demo_pipeline
from tests.support.helpers import rel, unet_output, weights
from tests.support.reference import reference_hardening, reference_weights

ERASE = ["van gogh", "picasso"]
GUIDES = ["art", ""]


def fresh(family):
    return diffusers_uce.attach(make_demo_pipeline(family))


def apply(pipe, *args, **kwargs):
    return pipe.apply_concept_edits(*args, held_out=[], **kwargs)


def check_weights(got, expected, original):
    for name, e in expected.items():
        change = (e - original[name].double()).norm()
        assert change > 1e-4 * e.norm(), name  # the edit moves every layer
        assert float((got[name].double() - e).norm() / change) < 2e-3, name


@pytest.mark.parametrize("tokens", ["all", "record"])
def test_paper_edit_then_rounds_match_reference(pipe, family, tokens):
    """token_mode="paper", harden=3, reg=0.1: exactly UCE then three RECE rounds (DESIGN.md §8.1), both token
    choices; the report's recovery per round equals the transcription's."""
    original = weights(pipe)
    out = apply(pipe, ERASE, guide=GUIDES, token_mode="paper", harden=3,
                harden_options={"reg": 0.1, "tokens": tokens})
    record = out.edits[-1]
    assert record.harden == {"rounds": 3, "reg": 0.1, "lamb": 0.1, "preserve_scale": 0.1, "preserve": (" ", " "),
                             "tokens": tokens}
    edited = reference_weights(pipe, original, ERASE, GUIDES, [], "paper", 1.0, record.preserve_scale, 0.5,
                               "replace")
    expected, recovery = reference_hardening(pipe, original, edited, ERASE, GUIDES, "paper", 3, 0.1, tokens=tokens)
    pipe.fuse_concept_edits()
    check_weights(weights(pipe), expected, original)
    got = torch.tensor([r["recovery"] for r in out.report.robustness], dtype=torch.float64).T
    assert got.shape == (4, 2) and torch.allclose(got, recovery, atol=2e-3), (got, recovery)


def test_later_apply_replays_hardening_on_the_joint_solve(pipe, family):
    original = weights(pipe)
    apply(pipe, ERASE, guide=GUIDES, token_mode="paper", harden=2, harden_options={"reg": 0.1, "tokens": "record"})
    apply(pipe, "dog", guide="cat", token_mode="paper")
    assert [bool(r.harden) for r in pipe.concept_edits] == [True, False]
    joint = reference_weights(pipe, original, [*ERASE, "dog"], [*GUIDES, "cat"], [], "paper", 1.0, 1.0, 0.5,
                              "replace")
    expected, _ = reference_hardening(pipe, original, joint, ERASE, GUIDES, "paper", 2, 0.1, tokens="record")
    pipe.fuse_concept_edits()
    check_weights(weights(pipe), expected, original)
    rows = pipe.concept_edit_report.robustness
    assert [(r["concept"], r["rounds"], len(r["recovery"])) for r in rows] == [
        ("van gogh", 2, 3), ("picasso", 2, 3), ("dog", 0, 1)]


def test_recovery_falls_round_by_round_on_the_demo():
    pipe = fresh("sd1")
    out = pipe.apply_concept_edits(["van gogh", "picasso", "nudity"], token_mode="paper", harden=3,
                                   harden_options={"reg": 0.1})
    recovery = torch.tensor([r["recovery"] for r in out.report.robustness])
    total = recovery.sum(0)
    assert (total[1:] < total[:-1]).all(), recovery  # the total over concepts falls with every round
    assert (recovery[:, -1] < recovery[:, 0]).all()
    text = str(out)
    assert "robustness (adversarial recovery" in text
    assert re.search(r"\s0\.1\s+3\s+(-?[\d.]+ → ){3}-?[\d.]+\s", text)  # ρ, rounds, recovery per round
    data = json.loads(out.report.to_json())
    assert data["robustness"][0]["recovery"] == out.report.robustness[0]["recovery"]
    # hardening trades preservation for robustness: held-out concepts move more than without it
    plain = fresh("sd1").apply_concept_edits(["van gogh", "picasso", "nudity"], token_mode="paper")
    assert plain.report.robustness[0]["recovery"][0] > recovery[0, -1]
    assert out.report.summary()["mean_held_out_interference"] > plain.report.summary()["mean_held_out_interference"]


def test_every_way_out_of_the_pipeline(pipe, family, tmp_path):
    apply(pipe, ERASE, guide=GUIDES, harden=2)
    assert all(g.solution.low_rank is None for g in pipe._uce_state.groups)
    original, processed = weights(pipe), unet_output(pipe)
    pipe.fuse_concept_edits()
    assert rel(unet_output(pipe), processed) < 1e-4  # processor mode = fused
    pipe.set_concept_edit_scale(0.5)
    half = weights(pipe)
    pipe.unfuse_concept_edits()
    assert all(torch.equal(original[n], w) for n, w in weights(pipe).items())
    error = pipe.save_concept_edits_as_lora(tmp_path / "lora")
    assert error < 1e-6  # exact: the composed change still has rank ≤ the tokens of the edit and its rounds
    pipe.save_concept_edits(tmp_path / "edit")
    loaded = fresh(family)
    loaded.load_concept_edits(tmp_path / "edit")
    assert loaded.concept_edits == pipe.concept_edits and loaded.concept_edits[0].harden["rounds"] == 2
    loaded.fuse_concept_edits()
    assert all(rel(w, half[n]) < 1e-5 for n, w in weights(loaded).items())
    # a later edit on the loaded pipeline replays the stored rounds exactly as on the original
    apply(loaded, "dog", guide="cat")
    apply(pipe, "dog", guide="cat")
    loaded.unfuse_concept_edits()
    assert all(rel(a.transform, b.transform) < 1e-10 for a, b in
               zip([g.solution for g in loaded._uce_state.groups], [g.solution for g in pipe._uce_state.groups]))
    pipe.unload_concept_edits()
    assert all(torch.equal(original[n], w) for n, w in weights(pipe).items())


def test_record_round_trips_and_presets():
    pipe = fresh("sd1")
    out = pipe.apply_concept_edits(moderate="nudity", harden=True, held_out=[])
    record = out.edits[-1]
    assert record.harden["rounds"] == 3 and record.harden["reg"] == 0.1
    assert ConceptEdit.from_dict(json.loads(json.dumps(record.to_dict()))) == record
    pipe.unload_concept_edits()
    art = pipe.apply_concept_edits("van gogh", guide="art", expand_prompts="art", harden=True, held_out=[])
    assert (art.edits[-1].harden["rounds"], art.edits[-1].harden["reg"]) == (1, 1e-3)
    assert art.edits[-1].harden["preserve"] == (" ",) * 6  # one per erased prompt (the bare concept + 5 templates)
    pipe.unload_concept_edits()
    other = pipe.apply_concept_edits("dog", guide="cat", harden=True, harden_options=HardenOptions(tokens="record"),
                                     held_out=[])
    assert (other.edits[-1].harden["rounds"], other.edits[-1].harden["reg"]) == (2, 0.1)
    assert other.edits[-1].harden["tokens"] == "record"
    with pytest.raises(ValueError, match="does not round-trip|invalid hardening|harden"):
        ConceptEdit.from_dict({**record.to_dict(), "harden": {**record.harden, "rounds": 0}})


@pytest.mark.parametrize("kwargs, match", [
    (dict(harden=-1), "harden"), (dict(harden=1.5), "harden"), (dict(harden="3"), "harden"),
    (dict(harden=1, harden_options={"reg": 0.0}), "reg"), (dict(harden=1, harden_options={"reg": math.nan}), "reg"),
    (dict(harden=1, harden_options={"lamb": -1.0}), "lamb"),
    (dict(harden=1, harden_options={"preserve_scale": math.inf}), "preserve_scale"),
    (dict(harden=1, harden_options={"rho": 0.1}), "rho"),
    (dict(harden=1, harden_options={"tokens": "last"}), "tokens"),
    (dict(harden=0, harden_options={"reg": 0.1}), "harden_options"),
    (dict(harden=1, technique="tensor"), "tensor"),
])
def test_bad_input_changes_nothing(kwargs, match):
    pipe = fresh("sd1")
    apply(pipe, "dog", guide="cat")
    before, records = weights(pipe), pipe.concept_edits
    with pytest.raises(ValueError, match=match):
        apply(pipe, ERASE, guide="art", **kwargs)
    assert pipe.concept_edits == records and all(torch.equal(before[n], w) for n, w in weights(pipe).items())


def test_refusals_before_anything_changes():
    pipe = fresh("sd1")
    with pytest.raises(ValueError, match="erased concepts"):
        concept_edit_request(None, debias={"doctor": ["male", "female"]}, harden=1)
    apply(pipe, "dog", guide="cat", harden=1)
    with pytest.raises(ValueError, match="hardened edit"):
        apply(pipe, "cat", guide="dog", technique="tensor")
    with pytest.raises(ValueError, match="hardened edit"):
        pipe.debias_concepts({"doctor": ["male", "female"]}, weights={"doctor": [0.1, 0.1]})
    assert len(pipe.concept_edits) == 1
    before = weights(pipe)
    with pytest.raises(ValueError, match="non-finite"):  # a round that overflows
        apply(pipe, "van gogh", guide="art", harden=1, harden_options={"preserve_scale": 1e308})
    assert len(pipe.concept_edits) == 1 and all(torch.equal(before[n], w) for n, w in weights(pipe).items())


def test_adversarial_embeds_drive_the_pipeline(pipe, family):
    with pytest.raises(ValueError, match="no concept edits"):
        pipe.adversarial_embeds("van gogh")
    apply(pipe, ERASE, guide=GUIDES)
    kwargs = pipe.adversarial_embeds("van gogh", reg=0.1)
    if family == "flux":  # what the pipeline would compute from the prompt: the attack replaces it, same shapes
        plain = pipe.encode_prompt("van gogh", None)
        shapes = {"prompt_embeds": plain[0].shape, "pooled_prompt_embeds": plain[1].shape}
    else:
        plain = pipe.encode_prompt("van gogh", device="cpu", num_images_per_prompt=1,
                                   do_classifier_free_guidance=False)
        shapes = {"prompt_embeds": plain[0].shape, **({"pooled_prompt_embeds": plain[2].shape} if family == "sdxl"
                                                       else {})}
    assert shapes["prompt_embeds"][:2] == ((1, 512) if family == "flux" else (1, 77))
    assert {k: v.shape for k, v in kwargs.items()} == shapes
    assert all(torch.isfinite(v).all() for v in kwargs.values())
    out = pipe(**kwargs, num_inference_steps=2, height=32, width=32, output_type="latent",
               generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out.images).all()
    with pytest.raises(ValueError, match="reg"):
        pipe.adversarial_embeds("van gogh", reg=0)

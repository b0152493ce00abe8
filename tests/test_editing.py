"""Behaviour of `apply_concept_edits` and the reversible/fusable edit on tiny pipelines, one class for all families."""

import json

import pytest
import torch
from diffusers import StableDiffusionPipeline

import diffusers_uce
from diffusers_uce import UCEAttnProcessor, UCEStableDiffusionPipeline
from diffusers_uce.demo import make_demo_pipeline
from helpers import rel, unet_output, weights
from reference import reference_layer, select_tokens

ERASE = ["van gogh", "picasso"]
PRESERVE = ["monet", "rembrandt", "a photo of a dog"]


def projections(pipe, kind="to_v"):
    return [(n, m) for n, m in pipe.unet.named_modules() if n.endswith(f"attn2.{kind}")]


class TestConceptEditing:
    @pytest.mark.parametrize("mode", ["last", "paper"])
    @pytest.mark.parametrize("technique", ["replace", "tensor"])
    def test_matches_float64_formula(self, pipe, mode, technique):
        guides = ["art", ""]
        original = weights(pipe)
        out = pipe.apply_concept_edits(ERASE, guide=guides, preserve=PRESERVE, token_mode=mode, technique=technique,
                                       erase_scale=1.5, lamb=0.7)
        record = out.edits[-1]
        pipe.fuse_concept_edits()
        pairs, kept = select_tokens(pipe, ERASE, guides, PRESERVE, mode)
        for name, module in pipe.unet.named_modules():
            if name in original:
                ref = reference_layer(original[name], pairs, kept, 1.5, record.preserve_scale, 0.7, technique)
                assert rel(module.weight, ref) < 1e-6, name
                assert rel(ref, original[name].double()) > 1e-3  # the edit did change this layer

    def test_float64_pipeline_is_exact(self, family):
        pipe = diffusers_uce.attach(make_demo_pipeline(family, torch_dtype=torch.float64))
        original = weights(pipe)
        pipe.apply_concept_edits(ERASE, guide="art", preserve=PRESERVE, technique="tensor")
        pipe.fuse_concept_edits()
        pairs, kept = select_tokens(pipe, ERASE, ["art", "art"], PRESERVE, "last")
        for name, module in pipe.unet.named_modules():
            if name in original:
                assert rel(module.weight, reference_layer(original[name], pairs, kept, 1.0, 1.0, 0.5, "tensor")) < 1e-10

    def test_paper_defaults(self, pipe):
        out = pipe.apply_concept_edits(ERASE, guide="art", preserve=PRESERVE, token_mode="paper")
        assert out.edits[0].preserve_scale == pytest.approx(max(0.1, 1 / (1 + len(PRESERVE))))
        assert [r["concept"] for r in out.report.preserved] == PRESERVE + [""]
        last = pipe.apply_concept_edits("cat", guide="dog").edits[-1]
        assert (last.preserve_scale, last.lamb, last.erase_scale) == (1.0, 0.5, 1.0)

    def test_erased_moves_to_guide_and_preserved_stay(self, pipe):
        pairs, kept = select_tokens(pipe, ERASE, ["art", "art"], PRESERVE, "last")
        before = {n: m.weight.detach().double().clone() for n, m in projections(pipe)}
        out = pipe.apply_concept_edits(ERASE, guide="art", preserve=PRESERVE)
        pipe.fuse_concept_edits()
        for name, module in projections(pipe):
            w, w_new = before[name], module.weight.detach().double()
            for (c, g), in pairs:
                # the erased token's values land (almost) on the guide's original values
                assert (w_new @ c - w @ g).norm() < 0.25 * (w @ c - w @ g).norm()
            for p in kept:
                assert (w_new @ p - w @ p).norm() < 0.1 * (w @ p).norm()
        assert all(r["efficacy"] > 0.75 for r in out.report.erased)
        assert all(r["interference"] < 0.1 for r in out.report.preserved)

    def test_processor_mode_leaves_weights_and_equals_fused(self, pipe):
        base = unet_output(pipe)
        original = weights(pipe)
        pipe.apply_concept_edits(ERASE, guide="art", preserve=PRESERVE, technique="tensor")
        assert all(torch.equal(original[n], w) for n, w in weights(pipe).items())
        attn = [m for n, m in pipe.unet.named_modules() if n.endswith("attn2")]
        assert all(isinstance(a.processor, UCEAttnProcessor) for a in attn)
        processed = unet_output(pipe)
        assert rel(processed, base) > 1e-3
        pipe.fuse_concept_edits()
        assert rel(unet_output(pipe), processed) < 1e-5
        pipe.unfuse_concept_edits()
        assert all(torch.equal(original[n], w) for n, w in weights(pipe).items())
        assert rel(unet_output(pipe), processed) < 1e-6

    def test_scale(self, pipe):
        base = unet_output(pipe)
        pipe.apply_concept_edits(ERASE, guide="art")
        full = unet_output(pipe)
        pipe.set_concept_edit_scale(0.0)
        assert torch.equal(unet_output(pipe), base)
        pipe.set_concept_edit_scale(0.5)
        half = unet_output(pipe)
        assert rel(half, base) > 1e-4 and rel(half, full) > 1e-4
        pipe.fuse_concept_edits()  # fused at 0.5 equals processor at 0.5
        assert rel(unet_output(pipe), half) < 1e-5
        pipe.set_concept_edit_scale(1.0)
        assert rel(unet_output(pipe), full) < 1e-5
        pipe.set_concept_edit_scale(2.0)
        assert rel(unet_output(pipe), full) > 1e-4

    def test_unload_is_bit_exact(self, pipe):
        original_weights = weights(pipe)
        original_processors = dict(pipe.unet.attn_processors)
        base = unet_output(pipe)
        pipe.apply_concept_edits(ERASE, guide="art", preserve=PRESERVE)
        pipe.fuse_concept_edits()
        pipe.set_concept_edit_scale(1.3)
        pipe.unload_concept_edits()
        assert all(torch.equal(original_weights[n], w) for n, w in weights(pipe).items())
        assert all(pipe.unet.attn_processors[k] is v for k, v in original_processors.items())
        assert torch.equal(unet_output(pipe), base)
        assert pipe.concept_edits == ()

    @pytest.mark.parametrize("fuse_between", [False, True])
    def test_successive_calls_equal_one_joint_call(self, family, fuse_between):
        one = diffusers_uce.attach(make_demo_pipeline(family))
        one.apply_concept_edits(ERASE + ["dog"], guide=["art", "art", "cat"], preserve=PRESERVE)
        one.fuse_concept_edits()
        two = diffusers_uce.attach(make_demo_pipeline(family))
        two.apply_concept_edits(ERASE, guide="art", preserve=PRESERVE)
        if fuse_between:
            two.fuse_concept_edits()
        out = two.apply_concept_edits("dog", guide="cat")
        assert [e.erase for e in two.concept_edits] == [tuple(ERASE), ("dog",)]
        assert len(out.report.erased) == 3
        two.fuse_concept_edits() if not fuse_between else None
        for (name, a), b in zip(weights(one).items(), weights(two).values()):
            assert rel(b, a) < 1e-5, name

    def test_edit_keys_false_and_layer_filter(self, pipe):
        before = weights(pipe)
        pipe.apply_concept_edits(ERASE, guide="art", edit_keys=False, layers=["up_blocks"])
        pipe.fuse_concept_edits()
        for name, w in weights(pipe).items():
            edited = name.endswith("to_v") and "up_blocks" in name
            assert torch.equal(w, before[name]) != edited, name

    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
    def test_half_precision(self, family, dtype):
        pipe = diffusers_uce.attach(make_demo_pipeline(family, torch_dtype=dtype))
        ref = diffusers_uce.attach(make_demo_pipeline(family))
        pipe.apply_concept_edits(ERASE, guide="art", preserve=PRESERVE)
        ref.apply_concept_edits(ERASE, guide="art", preserve=PRESERVE)
        processed = unet_output(pipe)
        assert torch.isfinite(processed).all()
        pipe.fuse_concept_edits()
        ref.fuse_concept_edits()
        assert all(w.dtype == dtype for w in weights(pipe).values())
        assert rel(unet_output(pipe), processed) < 2e-2
        for (name, a), b in zip(weights(ref).items(), weights(pipe).values()):
            assert rel(b, a) < 2e-2, name

    def test_save_fused_loads_without_plugin(self, pipe, tmp_path):
        pipe.apply_concept_edits(ERASE, guide="art")
        pipe.fuse_concept_edits()
        expected = unet_output(pipe)
        pipe.save_pretrained(tmp_path)
        assert json.loads((tmp_path / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
        loaded = StableDiffusionPipeline.from_pretrained(tmp_path)
        assert type(loaded) is StableDiffusionPipeline
        assert rel(unet_output(loaded), expected) < 1e-5  # a plain reload of any pipeline differs by ~1e-7

    def test_save_unfused_is_refused(self, pipe, tmp_path):
        pipe.apply_concept_edits(ERASE, guide="art")
        with pytest.raises(ValueError, match=r"not fused.*fuse_concept_edits\(\) first"):
            pipe.save_pretrained(tmp_path / "refused")
        assert not (tmp_path / "refused").exists()
        pipe.save_pretrained(tmp_path / "fused", fuse_concept_edits=True)
        assert pipe._uce_state.fused
        loaded = StableDiffusionPipeline.from_pretrained(tmp_path / "fused")
        assert rel(unet_output(loaded), unet_output(pipe)) < 1e-5

    def test_uce_pipeline_from_pretrained(self, family, tmp_path):
        make_demo_pipeline(family).save_pretrained(tmp_path)
        pipe = UCEStableDiffusionPipeline.from_pretrained(tmp_path)
        out = pipe.apply_concept_edits("van gogh", guide="art")
        assert out.edits[0].erase == ("van gogh",)
        image = pipe("a painting by van gogh", num_inference_steps=2, height=32, width=32, output_type="np",
                     generator=torch.Generator().manual_seed(0)).images
        assert image.shape == (1, 32, 32, 3)

    def test_report_renders(self, pipe):
        out = pipe.apply_concept_edits(ERASE, guide=None, preserve=["monet"], held_out=["a cat", "a house"])
        text = str(out)
        for word in ("van gogh", "picasso", "<unconditional>", "monet", "a cat", "efficacy", "interference"):
            assert word in text
        data = json.loads(out.report.to_json())
        assert [r["concept"] for r in data["held_out"]] == ["a cat", "a house"]
        assert data["summary"]["mean_efficacy"] > 0.5
        assert data["layers"] == len(projections(pipe)) * 2

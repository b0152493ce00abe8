"""The families whose edited layers read inputs the pipeline computes (SD3, FLUX.2, Qwen-Image, HiDream, Sana, PixArt,
Wan, CogVideoX): one class of tests for all of them, against the float64 transcription of each family's rule."""

import pytest
import torch

import diffusers_uce
from diffusers_uce.demo import make_demo_pipeline
from diffusers_uce.loaders.edit_state import EditState
from tests.support.helpers import rel, target_layers, weights
from tests.support.reference import groups, reference_layer, select_tokens

NEW_FAMILIES = ["sd3", "pixart", "pixart-alpha", "wan", "cogvideox", "sana", "hidream", "qwenimage", "flux2",
                "flux2-klein"]
ERASE = ["van gogh", "picasso"]
PRESERVE = ["monet", "a photo of a dog"]
CALL = {"wan": {"num_frames": 5, "height": 32, "width": 32}}


@pytest.fixture(params=NEW_FAMILIES)
def family(request):
    return request.param


@pytest.fixture
def pipe(family):
    return diffusers_uce.attach(make_demo_pipeline(family))


def reference(pipe, original, erase, guides, preserve, mode, preserve_scale, lamb=0.5):
    out = {}
    for names, encode in groups(pipe):
        pairs, kept = select_tokens(pipe, erase, guides, preserve, mode, encode)
        for name in names:
            # a bias is a constant outside FLUX.1: it cancels out of the targets (W′c + b = W c* + b)
            out[name] = reference_layer(original[name], pairs, kept, 1.0, preserve_scale, lamb, "replace")
    return out


def generate(pipe, family, prompt="a painting by van gogh"):
    kwargs = dict(prompt=prompt, num_inference_steps=2, output_type="latent", **CALL.get(family, {}))
    out = pipe(**kwargs, generator=torch.Generator().manual_seed(0))
    return (out.images if hasattr(out, "images") else out.frames).double()


class TestNewFamilies:
    def test_attach_picks_the_family(self, pipe, family):
        expected = {"pixart-alpha": "pixart"}.get(family, family)
        assert pipe._uce_family.name == expected
        edited = {p.name for g in pipe._uce_groups(EditState(True, None)) for p in g.projections}
        assert edited == {name for name, _ in target_layers(pipe)}  # the layers the family's rule names

    def test_matches_float64_reference(self, pipe, family):
        original = weights(pipe)
        guides = ["art", ""]
        pipe.apply_concept_edits(ERASE, guide=guides, preserve=PRESERVE, lamb=0.7)
        pipe.fuse_concept_edits()
        expected = reference(pipe, original, ERASE, guides, PRESERVE, "last", 1.0, lamb=0.7)
        for name, module in target_layers(pipe):
            assert rel(module.weight, expected[name]) < 1e-5, name
            assert rel(expected[name], original[name].double()) > 1e-4, name  # the edit did change this layer

    def test_processor_mode_equals_fused_and_unload_is_exact(self, pipe, family):
        original = weights(pipe)
        before = generate(pipe, family)
        pipe.apply_concept_edits(ERASE, guide="art", preserve=PRESERVE)
        assert all(torch.equal(module.weight, original[name]) for name, module in target_layers(pipe))
        hooked = generate(pipe, family)
        assert rel(hooked, before) > 1e-6  # the edit acts at generation time
        pipe.set_concept_edit_scale(0.0)
        assert rel(generate(pipe, family), before) < 1e-6
        pipe.set_concept_edit_scale(1.0)
        pipe.fuse_concept_edits()
        assert rel(generate(pipe, family), hooked) < 1e-4
        pipe.unfuse_concept_edits()
        pipe.unload_concept_edits()
        assert all(torch.equal(module.weight, original[name]) for name, module in target_layers(pipe))
        assert torch.equal(generate(pipe, family), before)

    def test_two_calls_equal_one_joint_call(self, family):
        one = diffusers_uce.attach(make_demo_pipeline(family))
        one.apply_concept_edits(ERASE[:1], guide="art")
        one.apply_concept_edits(ERASE[1:], guide="art")
        one.fuse_concept_edits()
        joint = diffusers_uce.attach(make_demo_pipeline(family))
        joint.apply_concept_edits(ERASE, guide="art")
        joint.fuse_concept_edits()
        for (name, a), (_, b) in zip(target_layers(one), target_layers(joint)):
            assert rel(a.weight, b.weight) < 1e-5, name

    def test_edit_file_round_trip(self, pipe, family, tmp_path):
        pipe.apply_concept_edits(ERASE, guide="art", preserve=PRESERVE, adapter_name="no-artists")
        pipe.save_concept_edits(tmp_path / "edit")
        pipe.fuse_concept_edits()
        other = diffusers_uce.attach(make_demo_pipeline(family))
        other.load_concept_edits(tmp_path / "edit")  # verified: solved again from its records
        assert other.get_concept_edit_names() == ["no-artists"]
        other.fuse_concept_edits()
        for (name, a), (_, b) in zip(target_layers(pipe), target_layers(other)):
            assert rel(b.weight, a.weight) < 1e-5, name

    def test_erased_concepts_move_to_their_guide(self, pipe, family):
        out = pipe.apply_concept_edits(ERASE, guide="art", held_out=[], lamb=1e-6)
        assert all(r["efficacy"] > 0.5 for r in out.report.erased), out.report.erased


LORA_LOADERS = {"pixart": False, "pixart-alpha": False}  # diffusers has no LoRA loader for PixArt


def test_every_feature_runs_or_is_refused(pipe, family, tmp_path):
    """Hardening, precise erasure, moderation, prompt expansion, debiasing with given weights and the LoRA exports:
    each works on every new family, or is refused with what to do before anything changes."""
    out = pipe.apply_concept_edits(ERASE, guide="art", harden=1, held_out=[])
    assert out.report.robustness and len(out.report.robustness[0]["recovery"]) == 2  # before and after the round
    pipe.unload_concept_edits()
    out = pipe.apply_concept_edits(ERASE, guide="a person", preserve=PRESERVE + ["a cat"], method="speed",
                                   held_out=[])
    assert out.report.invariants and max(r["change"] for r in out.report.invariants) < 1e-5  # kept exactly
    assert all(r["efficacy"] > 0 for r in out.report.erased)
    pipe.unload_concept_edits()
    assert pipe.apply_concept_edits(moderate="nudity", held_out=[]).report.erased[0]["concept"] == "nudity"
    pipe.unload_concept_edits()
    assert len(pipe.apply_concept_edits("van gogh", guide="art", expand_prompts="art", held_out=[]).report.erased) == 6
    pipe.unload_concept_edits()
    if family == "sd3":  # its context_embedder reads two encoders in turn: two tokens per concept
        with pytest.raises(ValueError, match="several text encoders one after the other"):
            pipe.debias_concepts({"doctor": ["male", "female"]}, weights={"doctor": [0.3, 0.7]})
        assert pipe.concept_edits == ()
    else:
        assert pipe.debias_concepts({"doctor": ["male", "female"]}, weights={"doctor": [0.3, 0.7]}).report.debiased
        pipe.unload_concept_edits()
    pipe.apply_concept_edits(ERASE, guide="art")
    with pytest.raises(ValueError, match="format='kohya' is not supported.*use format='diffusers'"):
        pipe.save_concept_edits_as_lora(tmp_path / "kohya", format="kohya")
    assert not (tmp_path / "kohya").exists()
    assert pipe.save_concept_edits_as_lora(tmp_path / "lora") < 1e-10  # exact
    pipe.fuse_concept_edits()
    with pytest.raises(ValueError, match="single-file export supports"):
        pipe.save_single_file(tmp_path / "model.safetensors")
    if LORA_LOADERS.get(family, True):  # the pipeline's own load_lora_weights gives the fused weights
        plain = make_demo_pipeline(family)
        plain.load_lora_weights(tmp_path / "lora")
        plain.fuse_lora()
        for name, module in target_layers(pipe):
            assert rel(plain.transformer.get_submodule(name).weight, module.weight) < 1e-5, name


@pytest.mark.parametrize("family", ["sd3", "hidream", "wan"])
def test_command_line_on_the_demo(family, tmp_path):
    from diffusers import DiffusionPipeline

    from tests.support.helpers import run_cli

    code, out, err = run_cli("edit", "--model", f"demo-{family}", "--erase", "van gogh", "--guide", "art",
                             "--device", "cpu", "--output", tmp_path / "edited")
    assert code == 0, err
    assert "van gogh" in out
    reloaded = DiffusionPipeline.from_pretrained(tmp_path / "edited")  # a plain diffusers folder
    original = make_demo_pipeline(family)
    changed = [n for n, _ in target_layers(original)
               if not torch.equal(reloaded.transformer.get_submodule(n).weight, original.transformer.get_submodule(
                   n).weight)]
    assert changed and set(changed) <= {n for n, _ in target_layers(original)}


def test_wan_22_edits_both_experts():
    """Wan 2.2 A14B denoises with two transformers (high-noise, then low-noise): each has its own text embedder, so
    each expert's cross-attention is a group of its own, and both carry the edit."""
    from diffusers import WanPipeline

    high, low = make_demo_pipeline("wan"), make_demo_pipeline("wan", seed=1)
    pipe = diffusers_uce.attach(WanPipeline(**{**high.components, "transformer_2": low.transformer},
                                            boundary_ratio=0.5))
    assert [g.group.component for g in pipe._uce_groups(EditState(True, None))] == ["transformer", "transformer_2"]
    before = {n: m.weight.clone() for n, m in pipe.transformer_2.named_modules() if n.endswith(("attn2.to_v",))}
    pipe.apply_concept_edits(ERASE, guide="art", preserve=PRESERVE)
    hooked = generate(pipe, "wan")
    pipe.fuse_concept_edits()
    assert rel(generate(pipe, "wan"), hooked) < 1e-4
    assert all(not torch.equal(pipe.transformer_2.get_submodule(n).weight, w) for n, w in before.items())
    # the low-noise expert's layers read its own text embedder's output: its edit is that of the same records
    single = diffusers_uce.attach(WanPipeline(**{**low.components}))
    single.apply_concept_edits(ERASE, guide="art", preserve=PRESERVE)
    single.fuse_concept_edits()
    for name in before:
        assert rel(pipe.transformer_2.get_submodule(name).weight, single.transformer.get_submodule(name).weight) < 1e-5


@pytest.mark.parametrize("family", ["pixart", "wan", "cogvideox", "sana", "hidream", "flux2", "flux2-klein"])
def test_paper_mode_matches_float64_reference(family):
    """"paper" tokens (each erased prompt's positions from its last token to the end, paired with its guide's; every
    position of the preserved prompts and of "") on the families whose inputs have a fixed length."""
    pipe = diffusers_uce.attach(make_demo_pipeline(family))
    original = weights(pipe)
    out = pipe.apply_concept_edits(ERASE, guide=["art", ""], preserve=PRESERVE, token_mode="paper", held_out=[])
    pipe.fuse_concept_edits()
    expected = reference(pipe, original, ERASE, ["art", ""], PRESERVE, "paper", out.edits[-1].preserve_scale)
    for name, module in target_layers(pipe):
        assert rel(module.weight, expected[name]) < 1e-5, name

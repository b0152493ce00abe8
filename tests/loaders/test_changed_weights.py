"""Edited weights changed in place under an applied edit (a LoRA merged with `fuse_lora`, `load_state_dict`): no
cache computed from the old weights is reused, and a change merged into fused edits survives unfusing."""

import pytest
import torch

import diffusers_uce
from diffusers_uce.demo import make_demo_pipeline
from tests.support.helpers import target_layers, weights

METHODS = {"hardened": dict(harden=1), "speed": dict(method="speed", preserve=["monet"])}


def change_in_place(pipe, seed=0):
    """What `fuse_lora()` does to each edited layer: ``weight.data += ΔW`` (no version counter moves)."""
    generator = torch.Generator().manual_seed(seed)
    deltas = {}
    for name, module in target_layers(pipe):
        deltas[name] = 0.05 * torch.randn(module.weight.shape, generator=generator)
        module.weight.data += deltas[name]
    return deltas


@pytest.mark.parametrize("family", ["sd1", "flux"])
@pytest.mark.parametrize("method", list(METHODS))
def test_a_solve_after_an_in_place_change_uses_the_new_weights(pipe, family, method):
    options = METHODS[method]
    pipe.apply_concept_edits("van gogh", guide="art", held_out=[], **options)  # caches G / the weakest directions
    change_in_place(pipe)
    pipe.apply_concept_edits("picasso", guide="art", held_out=[], **options)
    pipe.fuse_concept_edits()
    clean = diffusers_uce.attach(make_demo_pipeline(family))
    change_in_place(clean)
    clean.apply_concept_edits("van gogh", guide="art", held_out=[], **options)
    clean.apply_concept_edits("picasso", guide="art", held_out=[], **options)
    clean.fuse_concept_edits()
    expected = weights(clean)
    assert max(float((w - expected[n]).abs().max()) for n, w in weights(pipe).items()) < 1e-6


@pytest.mark.parametrize("family", ["sd1"])
def test_load_state_dict_under_an_edit_is_seen_too(pipe, family):
    pipe.apply_concept_edits("van gogh", guide="art", held_out=[], harden=1)
    other = make_demo_pipeline(family)
    change_in_place(other, seed=3)
    pipe.unet.load_state_dict(other.unet.state_dict())
    pipe.apply_concept_edits("picasso", guide="art", held_out=[], harden=1)
    clean = diffusers_uce.attach(other)
    clean.apply_concept_edits("van gogh", guide="art", held_out=[], harden=1)
    clean.apply_concept_edits("picasso", guide="art", held_out=[], harden=1)
    expected = clean.concept_edits and clean._uce_state.groups[0].solution.transform
    assert float((pipe._uce_state.groups[0].solution.transform - expected).abs().max()) < 1e-6


@pytest.mark.parametrize("family", ["sd1", "flux"])
@pytest.mark.parametrize("action", ["unfuse", "unload"])
def test_a_change_merged_into_fused_edits_is_carried_over(pipe, action, caplog):
    original = weights(pipe)
    pipe.apply_concept_edits("van gogh", guide="art", held_out=[])
    pipe.fuse_concept_edits()
    deltas = change_in_place(pipe)  # a LoRA fused into the edited weights
    getattr(pipe, f"{action}_concept_edits")()
    assert "changed since fuse_concept_edits" in caplog.text
    if action == "unfuse":
        pipe.unload_concept_edits()
    for name, weight in weights(pipe).items():
        assert float((weight - (original[name] + deltas[name])).abs().max()) < 1e-6


@pytest.mark.parametrize("family", ["sd1"])
def test_unchanged_fused_weights_still_unfuse_bit_for_bit(pipe):
    original = weights(pipe)
    pipe.apply_concept_edits("van gogh", guide="art", held_out=[])
    pipe.fuse_concept_edits()
    pipe.set_concept_edit_scale(0.5)
    pipe.unload_concept_edits()
    assert all(torch.equal(w, original[n]) for n, w in weights(pipe).items())

"""At generation time the processors transform the text states once, not once per layer and step, and recompute them
whenever the input, the solution or the strength changes."""

import pytest
import torch

import diffusers_uce
from diffusers_uce.demo import make_demo_pipeline
from diffusers_uce.loaders import processor
from tests.support.helpers import rel


@pytest.fixture
def calls(monkeypatch):
    """Count the input transforms the processors and hooks compute."""
    counted = []
    original = processor.apply_to_inputs
    monkeypatch.setattr(processor, "apply_to_inputs", lambda *a, **k: counted.append(1) or original(*a, **k))
    return counted


def generate(pipe, steps=3):
    out = pipe("a painting by van gogh", num_inference_steps=steps, height=32, width=32, output_type="latent",
               generator=torch.Generator().manual_seed(0))
    return out.images


@pytest.mark.parametrize("family", ["sd1", "flux"])
def test_one_transform_per_generation_same_result(family, calls, monkeypatch):
    pipe = diffusers_uce.attach(make_demo_pipeline(family))
    pipe.apply_concept_edits(["van gogh", "picasso"], guide="art", held_out=[])
    cached = generate(pipe)
    layers = len(pipe._uce_state.projections)
    # FLUX: two hooked layers, each with its own input (T5 states, pooled CLIP); SD: every attn2 reads one tensor
    assert len(calls) == (layers if family == "flux" else 1)
    monkeypatch.setattr(processor, "_compiling", lambda: True)  # the path torch.compile traces: no cache
    calls.clear()
    uncached = generate(pipe)
    assert len(calls) >= 3 * layers
    assert rel(cached, uncached) < 1e-6


def test_recomputed_when_strength_solution_or_input_change(calls):
    pipe = diffusers_uce.attach(make_demo_pipeline("sd1"))
    pipe.apply_concept_edits("van gogh", guide="art", held_out=[])
    group = pipe._uce_state.groups[0]
    edit = processor.ProjectionEdit(group, 0)
    x = torch.randn(2, 77, group.projections[0].module.in_features)
    with torch.no_grad():
        first = edit(x)
        assert edit(x) is first and len(calls) == 1
        pipe.set_concept_edit_scale(0.5)
        half = edit(x)
        assert len(calls) == 2 and rel(half - x, (first - x) / 2) < 1e-5
        pipe.apply_concept_edits("picasso", guide="art", held_out=[])  # a new joint solution
        edit(x)
        assert len(calls) == 3
        x.mul_(2)  # changed in place: the same object, a new version
        assert rel(edit(x), processor.apply_to_inputs(x, *_terms(group, 0.5))) < 1e-6 and len(calls) == 5


def _terms(group, scale):
    delta, _ = group.device_terms(torch.device("cpu"))
    return (delta * scale,)

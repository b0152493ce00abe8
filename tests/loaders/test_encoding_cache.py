"""A later edit encodes only the prompts the pipeline has not encoded yet; changed text encoders are read again."""

import pytest
import torch

import diffusers_uce
from diffusers_uce.demo import make_demo_pipeline
from diffusers_uce.loaders import solver
from tests.support.helpers import weights


@pytest.fixture
def encoded(monkeypatch):
    """The prompts every text-encoder pass of the package reads, call by call."""
    calls = []
    real = solver.encode_prompts

    def counting(encoders, prompts, **kwargs):
        calls.append(list(prompts))
        return real(encoders, prompts, **kwargs)

    monkeypatch.setattr(solver, "encode_prompts", counting)
    return calls


def test_a_later_edit_encodes_only_new_prompts(pipe, encoded):
    pipe.apply_concept_edits(["van gogh", "picasso"], guide="art", preserve=["monet"], held_out=["a dog"])
    first = sum(len(c) for c in encoded)
    encoded.clear()
    pipe.apply_concept_edits("rembrandt", guide="art", held_out=["a dog"])
    assert {p for c in encoded for p in c} == {"rembrandt"} and first > 1
    encoded.clear()
    pipe.unload_concept_edits()  # the cache belongs to the pipeline, not to the edit
    pipe.apply_concept_edits("van gogh", guide="art", held_out=["a dog"])
    assert encoded == []


def test_the_cache_gives_the_same_edit(pipe, family):
    pipe.apply_concept_edits(["van gogh", "picasso"], guide="art", preserve=["monet"], held_out=[])
    pipe.apply_concept_edits("rembrandt", guide="art", held_out=[])  # prompts of the first call from the cache
    pipe.fuse_concept_edits()
    fresh = diffusers_uce.attach(make_demo_pipeline(family))
    fresh.apply_concept_edits(["van gogh", "picasso"], guide="art", preserve=["monet"], held_out=[])
    fresh.apply_concept_edits("rembrandt", guide="art", held_out=[])
    fresh.fuse_concept_edits()
    assert all(torch.equal(w, weights(fresh)[n]) for n, w in weights(pipe).items())


@pytest.mark.parametrize("family", ["sd1"])
def test_changed_encoders_and_full_length_requests_encode_again(pipe, encoded):
    pipe.apply_concept_edits("van gogh", guide="art", held_out=[])
    encoded.clear()
    pipe.unload_concept_edits()
    with torch.no_grad():
        next(pipe.text_encoder.parameters()).mul_(1.5)  # an in-place change of the encoder
    pipe.apply_concept_edits("van gogh", guide="art", held_out=[])
    assert {p for c in encoded for p in c} == {"van gogh", "art"}
    encoded.clear()
    pipe.unload_concept_edits()
    pipe.apply_concept_edits("van gogh", guide="art", held_out=[], token_mode="paper")  # needs every position
    assert {"van gogh", "art"} <= {p for c in encoded for p in c}


@pytest.mark.parametrize("family", ["sd1"])
def test_the_debias_loop_encodes_each_prompt_once(pipe, encoded):
    """Every iteration re-solves the edit with new weights but the same prompts: only the first one encodes them."""
    fast = dict(num_images=2, num_inference_steps=1, height=16, width=16, batch_size=4, prompt_templates=("{}",))
    shares = iter([0.75, 0.7, 0.65, 0.6])

    def classifier(images, labels):
        first = next(shares) * len(images)
        return [labels[0] if i < first else labels[1] for i in range(len(images))]

    out = pipe.debias_concepts({"doctor": ["male", "female"]}, classifier=classifier, max_iterations=3,
                               options={**fast, "step": 1.0}, held_out=[])
    assert out.report.ratios[0]["iterations"] == 3  # three solves
    prompts = [p for call in encoded for p in call]
    assert prompts and len(prompts) == len(set(prompts))  # no prompt encoded twice

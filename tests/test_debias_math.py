"""The debiasing solve (fixed attribute weights, no loop) against the float64 transcription."""

import pytest
import torch

from helpers import rel, weights
from reference import full_states, reference_layer, select_tokens


@pytest.mark.parametrize("technique", ["replace", "tensor"])
def test_debias_matches_float64_formula(pipe, technique):
    original = weights(pipe)
    debias = {"doctor": ["male", "female"], "nurse": [["male", "female"], ["young", "old"]]}
    debias_weights = {"doctor": [0.3, -0.1], "nurse": [[0.0, 0.4], [0.2, 0.1]]}
    out = pipe.apply_concept_edits(["van gogh"], guide="art", preserve=["monet"], technique=technique,
                                   erase_scale=1.3, debias=debias, debias_weights=debias_weights)
    assert out.edits[-1].debias[1].attribute_prompts() == ("male nurse", "female nurse", "young nurse", "old nurse")
    pipe.fuse_concept_edits()
    pairs, kept = select_tokens(pipe, ["van gogh"], ["art"], ["monet"], "last")
    prompts = ["doctor", "male doctor", "female doctor", "nurse", "male nurse", "female nurse", "young nurse",
               "old nurse"]
    states = {p: s[k] for p, (s, k) in full_states(pipe, prompts).items()}
    debiased = [
        (states["doctor"], [(states["male doctor"], 0.3), (states["female doctor"], -0.1)]),
        (states["nurse"], [(states[f"{a} nurse"], w) for a, w in zip(["male", "female", "young", "old"],
                                                                       [0.0, 0.4, 0.2, 0.1])]),
    ]
    for name, module in pipe.unet.named_modules():
        if name in original:
            ref = reference_layer(original[name], pairs, kept, 1.3, 1.0, 0.5, technique, debiased)
            assert rel(module.weight, ref) < 1e-6, name


def test_debias_moves_toward_weighted_attribute(pipe):
    states = {p: s[k] for p, (s, k) in full_states(pipe, ["doctor", "female doctor"]).items()}
    w = pipe.unet.get_submodule("mid_block.attentions.0.transformer_blocks.0.attn2.to_v").weight.detach().double()
    before = w @ states["doctor"]
    pipe.apply_concept_edits(debias={"doctor": ["male", "female"]}, debias_weights={"doctor": [0.0, 0.8]})
    pipe.fuse_concept_edits()
    after = pipe.unet.get_submodule("mid_block.attentions.0.transformer_blocks.0.attn2.to_v").weight.double()
    after = after.detach() @ states["doctor"]
    female = w @ states["female doctor"]
    cos = torch.nn.functional.cosine_similarity
    assert cos(after, female, dim=0) > cos(before, female, dim=0) + 0.05
    assert pipe.concept_edits[-1].erase == ()

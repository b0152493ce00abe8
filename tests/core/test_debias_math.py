"""The debiasing solve (fixed attribute weights, no loop) against the float64 transcription, on every family."""

import pytest
import torch

from tests.support.helpers import rel, weights
from tests.support.reference import (
    attribute_shift,
    denoiser,
    full_states,
    groups,
    probe_layers,
    reference_layer,
    select_tokens,
)

DEBIAS = {"doctor": ["male", "female"], "nurse": [["male", "female"], ["young", "old"]]}
DEBIAS_WEIGHTS = {"doctor": [0.3, -0.1], "nurse": [[0.0, 0.4], [0.2, 0.1]]}


def debiased_tokens(pipe, encode):
    """``[(c, [(c_a, w_a), ...])]`` of `DEBIAS` with `DEBIAS_WEIGHTS`: last tokens of the concept and its
    attributes."""
    out = []
    for concept, sets in DEBIAS.items():
        sets = sets if isinstance(sets[0], list) else [sets]
        ws = DEBIAS_WEIGHTS[concept] if isinstance(DEBIAS_WEIGHTS[concept][0], list) else [DEBIAS_WEIGHTS[concept]]
        prompts = [f"{a} {concept}" for attributes in sets for a in attributes]
        states = {p: s[k] for p, (s, k) in full_states(pipe, [concept, *prompts], encode).items()}
        out.append((states[concept], [(states[p], w) for p, w in zip(prompts, (w for ws_ in ws for w in ws_))]))
    return out


@pytest.mark.parametrize("technique", ["replace", "tensor"])
def test_debias_matches_float64_formula(pipe, technique):
    """Every target group (both of FLUX's, each with its own tokens and its bias) against its own oracle solve."""
    original = weights(pipe)
    pipe.apply_concept_edits(["van gogh"], guide="art", preserve=["monet"], technique=technique, erase_scale=1.3,
                             held_out=[])
    out = pipe.debias_concepts(DEBIAS, weights=DEBIAS_WEIGHTS, erase_scale=1.3, held_out=[])
    assert out.edits[-1].debias[1].attribute_prompts() == ("male nurse", "female nurse", "young nurse", "old nurse")
    pipe.fuse_concept_edits()
    for names, encode in groups(pipe):
        pairs, kept = select_tokens(pipe, ["van gogh"], ["art"], ["monet"], "last", encode)
        debiased = debiased_tokens(pipe, encode)
        for name in names:
            module = denoiser(pipe).get_submodule(name)
            ref = reference_layer(original[name], pairs, kept, 1.3, 1.0, 0.5, technique, debiased, bias=module.bias)
            assert rel(module.weight, ref) < 1e-6, name
            # the debias terms matter: the same solve without them is far from what was installed
            plain = reference_layer(original[name], pairs, kept, 1.3, 1.0, 0.5, technique, bias=module.bias)
            assert rel(plain, ref) > 1e-3, name


def test_debias_moves_toward_weighted_attribute(pipe):
    """In every group, the concept's output moves along the weighted attribute's output, by a large step."""
    cos = torch.nn.functional.cosine_similarity
    probes = probe_layers(pipe, "doctor", ["male", "female"])
    out = pipe.debias_concepts({"doctor": ["male", "female"]}, weights={"doctor": [0.0, 0.8]},
                                   held_out=[])
    assert out.edits[-1].erase == ()
    pipe.fuse_concept_edits()
    for name, shift, (_, female), norm in attribute_shift(pipe, probes):
        # target: W c + 0.8 ‖W c‖ W c_f / ‖W c_f‖; λ = 0.5 pulls back toward W, but not this far
        assert shift.norm() > 0.3 * norm and cos(shift, female, dim=0) > 0.99, name

"""The debiasing solve (fixed attribute weights, no loop) against the float64 transcription, on every family."""

import pytest
import torch
from helpers import rel, weights
from reference import denoiser, full_states, groups, reference_layer, select_tokens

DEBIAS = {"doctor": ["male", "female"], "nurse": [["male", "female"], ["young", "old"]]}
DEBIAS_WEIGHTS = {"doctor": [0.3, -0.1], "nurse": [[0.0, 0.4], [0.2, 0.1]]}


def debiased_tokens(pipe, encode):
    """``[(c, [(c_a, w_a), ...])]`` of `DEBIAS` with `DEBIAS_WEIGHTS`: last tokens of the concept and its attributes."""
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
    out = pipe.apply_concept_edits(["van gogh"], guide="art", preserve=["monet"], technique=technique,
                                   erase_scale=1.3, debias=DEBIAS, debias_weights=DEBIAS_WEIGHTS, held_out=[])
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


def probe_layers(pipe, concept, attributes):
    """Before an edit: per target group, one value layer (name, weight, bias) and the last tokens of `concept` and of
    ``"{attribute} {concept}"`` as that group reads them."""
    probes = []
    for names, encode in groups(pipe):
        name = next((n for n in names if n.startswith("mid_block") and n.endswith("to_v")), names[0])
        module = denoiser(pipe).get_submodule(name)
        states = full_states(pipe, [concept, *(f"{a} {concept}" for a in attributes)], encode)
        probes.append((name, module.weight.detach().double().clone(), module.bias, [s[k] for s, k in states.values()]))
    return probes


def attribute_shift(pipe, probes):
    """After a fused debias edit of the probed concept alone (default scales): per probe, the shift of the concept's
    output caused by its attribute weights, ``(W' − W'_0) c``, and the attributes' unit outputs ``W c_a / ‖W c_a‖``.

    ``W'_0`` is the oracle's solve of the same target with zero weights: ``W`` itself without a bias; with FLUX's kept
    bias, whose targets include ``b`` (DESIGN.md §1), it already moves ``c`` by a multiple of ``b``.
    """
    out = []
    for name, w, bias, (c, *attributes) in probes:
        zero = reference_layer(w, [], [], 1.0, 1.0, 0.5, "replace", [(c, [(a, 0.0) for a in attributes])], bias=bias)
        edited = denoiser(pipe).get_submodule(name).weight.detach().double()
        out.append((name, (edited - zero) @ c, [w @ a / (w @ a).norm() for a in attributes], (w @ c).norm()))
    return out


def test_debias_moves_toward_weighted_attribute(pipe):
    """In every group, the concept's output moves along the weighted attribute's output, by a large step."""
    cos = torch.nn.functional.cosine_similarity
    probes = probe_layers(pipe, "doctor", ["male", "female"])
    out = pipe.apply_concept_edits(debias={"doctor": ["male", "female"]}, debias_weights={"doctor": [0.0, 0.8]},
                                   held_out=[])
    assert out.edits[-1].erase == ()
    pipe.fuse_concept_edits()
    for name, shift, (_, female), norm in attribute_shift(pipe, probes):
        # target: W c + 0.8 ‖W c‖ W c_f / ‖W c_f‖; λ = 0.5 pulls back toward W, but not this far
        assert shift.norm() > 0.3 * norm and cos(shift, female, dim=0) > 0.99, name

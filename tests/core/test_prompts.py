"""Token selection and encoding semantics (DESIGN.md §2), on every pipeline family.

Every family-parametrised test walks the family's target groups (`pipe._uce_family.groups`: one for SD 1.x/2.x and
SDXL, two for FLUX) and compares the package's encoding of each group with the float64 oracle of `reference.py`
(`reference.groups(pipe)`, in the same order) or with the pipeline's own `encode_prompt`.
"""

import logging

import pytest
import torch

from diffusers_uce.core.concepts import I2P_CATEGORY_CONCEPTS
from diffusers_uce.core.edits import build_concept_edit
from diffusers_uce.core.engine import assemble_terms
from diffusers_uce.core.prompts import encode_prompts, pair_positions, preserve_positions
from diffusers_uce.core.report import DEFAULT_HOLDOUT_CONCEPTS
from diffusers_uce.demo import make_clip_tokenizer
from diffusers_uce.loaders.encoding_cache import clear_encoding_cache
from tests.support.reference import family_of, full_states, groups, select_tokens

# k of "", "dog", "a photo of a dog" per target group: CLIP counts the start token, T5 (FLUX) has none and its "" is
# the end token alone, a pooled embedding is one token per prompt.
EXPECTED_K = {"unet": [0, 1, 5], "transformer.context_embedder": [0, 0, 4], "transformer.text_embedder": [0, 0, 0]}


def group_pairs(pipe):
    """``[(package TargetGroup, reference encode)]``, checked to describe the same layers."""
    pairs = list(zip(pipe._uce_family.groups, groups(pipe)))
    assert len(pairs) == len(pipe._uce_family.groups) == len(groups(pipe))
    for group, (names, _) in pairs:
        assert group.cross_attention or list(group.modules) == names
    return pairs


def encode(pipe, group, prompts, last_only=True):
    return pipe._uce_encode(group, prompts, last_only, pipe.device)


def padded_length(pipe, group):
    """The length a group's prompts are padded to: the family's (T5: 512) or the first tokenizer's (CLIP: 77)."""
    return group.text.max_length or getattr(pipe, group.text.encoders[0][0]).model_max_length


def hook_encoders(pipe):
    """Record the input shape of every call of every text encoder the family reads, by pipeline attribute."""
    calls = {}
    for group in pipe._uce_family.groups:
        for _, name in group.text.encoders:
            if name not in calls:
                calls[name] = []
                getattr(pipe, name).register_forward_hook(
                    lambda m, args, out, log=calls[name]: log.append(tuple(args[0].shape)))
    return calls


@torch.no_grad()  # as in the pipelines' `__call__` (T5's kernels differ by ~1e-5 with autograd on)
def conditioning(pipe, prompts):
    """What the pipeline's own `encode_prompt` conditions each target group on, by group name."""
    family = family_of(pipe)
    if family == "flux":
        embeds, pooled, _ = pipe.encode_prompt(prompts, prompt_2=None, device=pipe.device, max_sequence_length=512)
        return {"transformer.context_embedder": embeds, "transformer.text_embedder": pooled[:, None]}
    embeds = pipe.encode_prompt(prompts, device=pipe.device, num_images_per_prompt=1,
                                do_classifier_free_guidance=False)[0]
    return {"unet": embeds}


def test_last_index(pipe):
    prompts = ["", "dog", "a photo of a dog"]
    for group, (_, ref_encode) in group_pairs(pipe):
        encoded = encode(pipe, group, prompts)
        reference = full_states(pipe, prompts, ref_encode)
        assert encoded.last.tolist() == [reference[p][1] for p in prompts] == EXPECTED_K[group.name]


def test_paper_positions():
    pair, e, g = pair_positions(torch.tensor([3, 1]), torch.tensor([1, 4]), "paper", 77)
    first, second = pair == 0, pair == 1
    assert e[first].tolist() == list(range(3, 77)) and g[first].tolist() == list(range(1, 75))
    assert e[second].tolist() == list(range(1, 74)) and g[second].tolist() == list(range(4, 77))
    pair, e, g = pair_positions(torch.tensor([3, 1]), torch.tensor([1, 4]), "last", 77)
    assert (pair.tolist(), e.tolist(), g.tolist()) == ([0, 1], [3, 1], [1, 4])
    prompt, pos = preserve_positions(torch.tensor([2, 5]), "paper", 77)
    assert prompt.tolist() == [0] * 77 + [1] * 77 and pos.tolist() == list(range(77)) * 2
    assert [t.tolist() for t in preserve_positions(torch.tensor([2, 5]), "last", 77)] == [[0, 1], [2, 5]]


@pytest.mark.parametrize("mode", ["last", "paper"])
def test_selected_tokens_match_definition(pipe, mode):
    erase, guides, preserve = ["van gogh", "dog"], ["art", ""], ["monet", "a cat"]
    record = build_concept_edit(erase, guides, preserve, token_mode=mode)
    for group, (_, ref_encode) in group_pairs(pipe):
        terms = assemble_terms([record], encode(pipe, group, record.prompts(), mode == "last")).terms
        pairs, kept = select_tokens(pipe, erase, guides, preserve, mode, encode=ref_encode)
        expected_c = torch.stack([c for block in pairs for c, _ in block])
        expected_g = torch.stack([g for block in pairs for _, g in block])
        assert terms.erase.shape == expected_c.shape and terms.preserve.shape[0] == len(kept)
        assert torch.allclose(terms.erase, expected_c, atol=1e-5)
        assert torch.allclose(terms.guide, expected_g, atol=1e-5)
        assert torch.allclose(terms.preserve, torch.stack(kept), atol=1e-5)
        if mode == "paper":  # "" is always preserved (all positions), an empty guide is encoded as " "
            assert record.preserve_prompts()[-1] == "" and record.guide_prompt("") == " "
            assert terms.preserve.shape[0] == 3 * (1 if group.text.output == "pooled" else padded_length(pipe, group))
        else:
            assert terms.erase.shape[0] == 2 and terms.preserve.shape[0] == 2


def test_states_are_what_the_pipeline_conditions_on(pipe):
    """Full-length states equal `encode_prompt`'s embeddings (SDXL: both towers' penultimate states concatenated;
    FLUX: the T5 `prompt_embeds` at 512 and the pooled CLIP `pooled_prompt_embeds`); "last" mode keeps them at k."""
    prompts = ["van gogh", "", "a photo of a dog"]
    expected = conditioning(pipe, prompts)
    for group in pipe._uce_family.groups:
        full, cut = encode(pipe, group, prompts, last_only=False), encode(pipe, group, prompts, last_only=True)
        rows, k = full.rows(prompts), full.last
        assert full.states.shape == expected[group.name].shape
        assert torch.allclose(full.states[rows], expected[group.name], atol=1e-5)
        at_k = expected[group.name][torch.arange(len(prompts)), k[rows]]
        assert torch.equal(cut.last, k) and torch.allclose(cut.states[rows, k[rows]], at_k, atol=1e-5)


def test_one_batched_pass_per_encoder(pipe):
    """Every distinct prompt is encoded once, in one call per encoder; causal towers are cut after the largest k
    (5), T5 and the pooled CLIP output (read at the end token) run at their full padded length."""
    calls = hook_encoders(pipe)
    prompts = ["van gogh", "art", "monet", "van gogh", "a photo of a dog"]
    for group, (_, ref_encode) in group_pairs(pipe):
        for log in calls.values():
            log.clear()
        encoded = encode(pipe, group, prompts)
        length = 6 if group.text.causal else padded_length(pipe, group)
        assert {name: calls[name] for _, name in group.text.encoders} == {
            name: [(4, length)] for _, name in group.text.encoders}
        full = full_states(pipe, list(encoded.index), ref_encode)
        for prompt, row in encoded.index.items():
            states, k = full[prompt]
            assert int(encoded.last[row]) == k
            assert torch.allclose(encoded.states[row, : k + 1].double(), states[: k + 1], atol=1e-5)
    for log in calls.values():
        log.clear()
    clear_encoding_cache(pipe)  # a first solve (the prompts above are cached: a later solve encodes only new ones)
    pipe.apply_concept_edits(["van gogh", "picasso"], guide="art", preserve=["monet"], held_out=["a cat"])
    assert {name: [c[0] for c in log] for name, log in calls.items()} == {name: [5] for name in calls}


def test_length_sorted_batches(pipe):
    """Smaller batches of length-sorted prompts are each cut at their own longest prompt (causal towers); other
    encoders keep their full length. The states do not depend on the batching."""
    calls = hook_encoders(pipe)
    prompts = ["a photo of a dog", "art", "van gogh", "a bowl of fruit on a table", "dog", "monet"]
    for group in pipe._uce_family.groups:
        one = encode(pipe, group, prompts)
        for log in calls.values():
            log.clear()
        # the batch size is not a pipeline option: call encode_prompts as `_uce_encode` does, with batch_size=2
        encoders = [(getattr(pipe, t), getattr(pipe, e)) for t, e in group.text.encoders]
        split = encode_prompts(encoders, prompts, causal_cut=group.text.causal, output=group.text.output,
                               max_length=group.text.max_length, batch_size=2)
        for _, name in group.text.encoders:
            lengths = [c[1] for c in calls[name]]
            assert [c[0] for c in calls[name]] == [2, 2, 2]
            if group.text.causal:
                assert lengths == sorted(lengths) and sum(lengths) < 3 * one.states.shape[1]
            else:
                assert lengths == [padded_length(pipe, group)] * 3
        for prompt, row in one.index.items():
            k = int(one.last[row])
            assert torch.allclose(split.states[split.index[prompt], : k + 1], one.states[row, : k + 1], atol=1e-5)


def test_guide_forms_are_equivalent():
    a = build_concept_edit(["x", "y"], None)
    assert a.guide == build_concept_edit(["x", "y"], "").guide == ("", "")
    assert build_concept_edit(["x", "y"], [None]).guide == ("", "")
    assert build_concept_edit(["x", "y"], ["art"]).guide == ("art", "art")
    assert build_concept_edit(["x", "y"], ["art", "cat"]).guide == ("art", "cat")


def test_long_prompt_warns(pipe, caplog):
    """A prompt over a tokenizer's limit (CLIP: 77; FLUX's T5: 512, so 520 words) warns with what was cut."""
    long_prompt = " ".join(["dog"] * 520) + " tail words"
    with caplog.at_level(logging.WARNING):
        pipe.apply_concept_edits(long_prompt, guide="art", held_out=[])
    limits = {padded_length(pipe, g) for g in pipe._uce_family.groups}
    assert limits == ({77, 512} if family_of(pipe) == "flux" else {77})
    for limit in limits:
        assert f"longer than the tokenizer's limit of {limit} tokens" in caplog.text
    assert "tail" in caplog.text and long_prompt[:20] in caplog.text


def test_distinct_pad_token_keeps_positions():
    sd1, sd2 = make_clip_tokenizer(), make_clip_tokenizer(pad_token="!")  # the sd1 and sd2 demo tokenizers
    a = sd1("a dog", padding="max_length", max_length=77)
    b = sd2("a dog", padding="max_length", max_length=77)
    assert a.input_ids[:4] == b.input_ids[:4] and a.input_ids[4] != b.input_ids[4]  # padded with "!" vs end token
    assert a.attention_mask == b.attention_mask and sum(b.attention_mask) == 4


@pytest.mark.parametrize("family", ["sd2"])
def test_sd2_exclamation_padding(pipe):
    """SD 2.x pads with "!": k is still the last real token (not the first pad), and "paper" mode reads the states
    of the "!"-padded ids after k (not those of an end-token padding)."""
    tokenizer = pipe.tokenizer
    ids = tokenizer("a dog", padding="max_length", max_length=77, return_tensors="pt").input_ids
    group = pipe._uce_family.groups[0]
    record = build_concept_edit(["a dog"], ["a cat"], token_mode="paper")
    encoded = encode(pipe, group, record.prompts(), last_only=False)
    k = int(encoded.last[encoded.index["a dog"]])
    assert k == 2 and tokenizer.convert_ids_to_tokens(int(ids[0, k])).startswith("dog")
    assert int(ids[0, k + 1]) == tokenizer.eos_token_id
    assert (ids[0, k + 2 :] == tokenizer.convert_tokens_to_ids("!")).all() and tokenizer.pad_token == "!"
    terms = assemble_terms([record], encoded).terms
    with torch.no_grad():
        states = pipe.text_encoder(ids)[0][0].double()
        eos_padded = ids.masked_fill(torch.arange(77) > k + 1, tokenizer.eos_token_id)
        other = pipe.text_encoder(eos_padded)[0][0].double()
    assert terms.erase.shape[0] == 77 - k  # "a dog" and "a cat" both end at k = 2: positions 2 … 76
    assert torch.allclose(terms.erase, states[k:], atol=1e-5)
    assert not torch.allclose(terms.erase[2:], other[k + 2 :], atol=1e-3)  # the pads' states are the "!" ones


class _SplitsDifferently:
    """A tokenizer that sees `prompt` as `seen_as` (so it ends elsewhere) and delegates everything else."""

    def __init__(self, tokenizer, prompt, seen_as):
        self._tokenizer, self._prompt, self._seen_as = tokenizer, prompt, seen_as

    def __call__(self, prompts, **kwargs):
        return self._tokenizer([self._seen_as if p == self._prompt else p for p in prompts], **kwargs)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


@pytest.mark.parametrize("family", ["sdxl"])
def test_sdxl_tokenizers(pipe, caplog):
    """k comes from the first tokenizer: both agree on the demo prompts (no warning); where the second one ends a
    prompt elsewhere, a warning names the prompt and positions follow tokenizer 1."""
    group = pipe._uce_family.groups[0]
    i2p = [c for cs in I2P_CATEGORY_CONCEPTS.values() for c in cs]
    demo = [*DEFAULT_HOLDOUT_CONCEPTS, *i2p, "van gogh", "", "art"]
    with caplog.at_level(logging.WARNING):
        encoded = encode(pipe, group, demo)
    assert "disagree" not in caplog.text
    second = pipe.tokenizer_2(demo, padding="max_length", max_length=77, return_tensors="pt").attention_mask
    assert encoded.last[encoded.rows(demo)].tolist() == (second.sum(-1) - 2).tolist()

    prompts = ["van gogh", "a photo of a dog"]
    tokenizer_2 = _SplitsDifferently(pipe.tokenizer_2, "van gogh", "van gogh painting")
    with caplog.at_level(logging.WARNING):
        encoded = encode_prompts([(pipe.tokenizer, pipe.text_encoder), (tokenizer_2, pipe.text_encoder_2)], prompts,
                                 causal_cut=True, output="penultimate")
    assert "disagree" in caplog.text and "'van gogh'" in caplog.text and "tokenizer 2" in caplog.text
    assert "a photo of a dog" not in caplog.text
    assert encoded.last.tolist() == [2, 5]  # tokenizer 1's k ("gogh"), not tokenizer 2's 3 ("painting")
    ids = tokenizer_2(["van gogh"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        first = pipe.text_encoder(pipe.tokenizer("van gogh", return_tensors="pt").input_ids,
                                  output_hidden_states=True).hidden_states[-2][0, 2]
        second = pipe.text_encoder_2(ids, output_hidden_states=True).hidden_states[-2][0, 2]
    assert torch.allclose(encoded.states[encoded.index["van gogh"], 2], torch.cat([first, second]), atol=1e-5)


@pytest.mark.parametrize("family", ["flux"])
def test_flux_t5_is_not_cut(pipe):
    """T5 is bidirectional: a state at k depends on the tokens after it, so "last" mode encodes the full 512
    tokens, once, batched, and reads the same states as a full encoding (a cut one would differ)."""
    calls = hook_encoders(pipe)
    pipe.apply_concept_edits(["van gogh"], guide="art", preserve=["a photo of a dog"], held_out=[])
    assert calls["text_encoder_2"] == [(3, 512)]
    group = pipe._uce_family.groups[0]
    assert not group.text.causal and group.text.max_length == 512
    encoded = encode(pipe, group, ["a photo of a dog"])
    ids = pipe.tokenizer_2("a photo of a dog", padding="max_length", max_length=512, return_tensors="pt").input_ids
    with torch.no_grad():
        full = pipe.text_encoder_2(ids)[0][0, 4]
        cut = pipe.text_encoder_2(ids[:, :5])[0][0, 4]
    assert torch.allclose(encoded.states[0, 4], full, atol=1e-5)
    assert not torch.allclose(full, cut, atol=1e-3)

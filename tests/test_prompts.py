"""Token selection and encoding semantics (DESIGN.md §2)."""

import pytest
import torch

import diffusers_uce
from diffusers_uce.demo import make_demo_pipeline
from diffusers_uce.edits import build_concept_edit
from diffusers_uce.engine import assemble_terms
from diffusers_uce.prompts import encode_prompts, pair_positions, preserve_positions
from reference import full_states, select_tokens


@pytest.fixture(params=["sd1", "sd2"])
def pipe(request):
    return diffusers_uce.attach(make_demo_pipeline(request.param))


def test_last_index(pipe):
    states = full_states(pipe, ["", "dog", "a photo of a dog"])
    assert [states[p][1] for p in ("", "dog", "a photo of a dog")] == [0, 1, 5]


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
    encoded = encode_prompts(pipe.tokenizer, pipe.text_encoder, record.prompts(), causal_cut=mode == "last")
    terms = assemble_terms([record], encoded).terms
    pairs, kept = select_tokens(pipe, erase, guides, preserve, mode)
    expected_c = torch.stack([c for block in pairs for c, _ in block])
    expected_g = torch.stack([g for block in pairs for _, g in block])
    assert torch.allclose(terms.erase, expected_c, atol=1e-5) and torch.allclose(terms.guide, expected_g, atol=1e-5)
    assert torch.allclose(terms.preserve, torch.stack(kept), atol=1e-5)
    if mode == "paper":  # "" is always preserved, an empty guide is encoded as " "
        assert record.preserve_prompts()[-1] == "" and record.guide_prompt("") == " "
        assert terms.preserve.shape[0] == 3 * 77
    else:
        assert terms.erase.shape[0] == 2 and terms.preserve.shape[0] == 2


def test_distinct_pad_token_keeps_positions():
    sd1, sd2 = make_demo_pipeline("sd1"), make_demo_pipeline("sd2")
    a = sd1.tokenizer("a dog", padding="max_length", max_length=77)
    b = sd2.tokenizer("a dog", padding="max_length", max_length=77)
    assert a.input_ids[:4] == b.input_ids[:4] and a.input_ids[4] != b.input_ids[4]  # padded with "!" vs end token
    assert a.attention_mask == b.attention_mask and sum(b.attention_mask) == 4


def test_one_batched_causally_cut_pass(pipe):
    calls = []
    pipe.text_encoder.register_forward_hook(lambda m, args, out: calls.append(tuple(args[0].shape)))
    prompts = ["van gogh", "art", "monet", "van gogh", "a photo of a dog"]
    encoded = encode_prompts(pipe.tokenizer, pipe.text_encoder, prompts, causal_cut=True)
    assert calls == [(4, 6)]  # 4 distinct prompts, cut after the largest k = 5
    full = full_states(pipe, list(encoded.index))
    for prompt, row in encoded.index.items():
        states, k = full[prompt]
        assert int(encoded.last[row]) == k
        assert torch.allclose(encoded.states[row, : k + 1].double(), states[: k + 1], atol=1e-5)
    calls.clear()
    pipe.apply_concept_edits(["van gogh", "picasso"], guide="art", preserve=["monet"], held_out=["a cat"])
    assert len(calls) == 1 and calls[0][0] == 5


def test_guide_forms_are_equivalent(pipe):
    a = build_concept_edit(["x", "y"], None)
    assert a.guide == build_concept_edit(["x", "y"], "").guide == build_concept_edit(["x", "y"], [None]).guide == ("", "")
    assert build_concept_edit(["x", "y"], ["art"]).guide == ("art", "art")
    assert build_concept_edit(["x", "y"], ["art", "cat"]).guide == ("art", "cat")


def test_long_prompt_warns(pipe, caplog):
    long_prompt = " ".join(["dog"] * 80) + " tail words"
    pipe.apply_concept_edits(long_prompt, guide="art")
    assert "longer than the tokenizer's limit of 77 tokens" in caplog.text
    assert "tail" in caplog.text and long_prompt[:20] in caplog.text


def test_length_sorted_batches_cut_each_batch(pipe):
    calls = []
    pipe.text_encoder.register_forward_hook(lambda m, args, out: calls.append(tuple(args[0].shape)))
    prompts = ["a photo of a dog", "art", "van gogh", "a bowl of fruit on a table", "dog", "monet"]
    one = encode_prompts(pipe.tokenizer, pipe.text_encoder, prompts, causal_cut=True)
    calls.clear()
    split = encode_prompts(pipe.tokenizer, pipe.text_encoder, prompts, causal_cut=True, batch_size=2)
    assert [c[0] for c in calls] == [2, 2, 2] and [c[1] for c in calls] == sorted(c[1] for c in calls)
    assert sum(c[1] for c in calls) < 3 * one.states.shape[1]  # short prompts are not padded to the longest
    for prompt, row in one.index.items():
        k = int(one.last[row])
        assert torch.allclose(split.states[split.index[prompt], : k + 1], one.states[row, : k + 1], atol=1e-5)

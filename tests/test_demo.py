import copy
import json
import random

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from diffusers_uce import demo
from diffusers_uce.demo import DEMO_FAMILIES, make_clip_tokenizer, make_demo_pipeline


KNOWN_WORDS = [
    "painting", "art", "style", "artwork", "picture", "portrait", "photo", "image", "van", "gogh", "picasso",
    "monet", "rembrandt", "kelly", "mckernan", "thomas", "kinkade", "kilian", "eng", "tyler", "edlin", "ajin",
    "demi", "human", "doctor", "nurse", "teacher", "ceo", "dog", "cat", "car", "church", "parachute", "tench",
    "golf", "ball", "chainsaw", "garbage", "truck", "french", "horn", "english", "springer", "cassette", "player",
    "gas", "pump", "nudity", "violence", "male", "female",
]
ODD_TEXTS = ["zxqvj fnordle", "ñandú über café", "日本の絵 🙂🎨", "x" * 40, "3.14 + 42 = ??", "C'est l'été, isn't it"]


def _run(pipe, prompt="a dog", seed=0):
    generator = torch.Generator().manual_seed(seed)
    return pipe(prompt, num_inference_steps=2, height=32, width=32, output_type="np", generator=generator).images


@pytest.fixture(scope="module")
def tokenizer():
    return make_clip_tokenizer()


@pytest.fixture(scope="module", params=DEMO_FAMILIES)
def pipe(request):
    return make_demo_pipeline(request.param)


# --------------------------------------------------------------------------------------------- tokenizer


@pytest.mark.parametrize("text", ODD_TEXTS)
def test_any_text_tokenises_into_byte_pieces(tokenizer, text):
    ids = tokenizer(text).input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    body = ids[1:-1]
    assert body and all(0 <= i < len(tokenizer) for i in body)
    # The unknown token is <|endoftext|>: it must never stand in for a piece of unknown text.
    assert tokenizer.eos_token_id not in body
    # Lossless up to spaces (CLIP decodes every word-final "</w>" as a space, also after digits and punctuation).
    assert tokenizer.decode(ids, skip_special_tokens=True).replace(" ", "") == text.lower().replace(" ", "")


def test_padding_to_max_length(tokenizer):
    enc = tokenizer("a dog", padding="max_length", max_length=77, truncation=True)
    n_real = len(tokenizer("a dog", add_special_tokens=False).input_ids)
    assert n_real == 2
    assert len(enc.input_ids) == 77 and enc.input_ids[0] == tokenizer.bos_token_id
    assert enc.input_ids[n_real + 1] == tokenizer.eos_token_id
    assert enc.attention_mask == [1] * (n_real + 2) + [0] * (77 - n_real - 2)
    # SD 1.x convention: padding with <|endoftext|>.
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    assert set(enc.input_ids[n_real + 1 :]) == {tokenizer.eos_token_id}


def test_empty_text_and_truncation(tokenizer):
    assert tokenizer("").input_ids == [tokenizer.bos_token_id, tokenizer.eos_token_id]
    assert tokenizer.model_max_length == 77
    ids = tokenizer("a painting of a dog " * 40, truncation=True).input_ids
    assert len(ids) == 77 and ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id


def test_known_words_are_single_distinct_tokens(tokenizer):
    ids = [tokenizer(word, add_special_tokens=False).input_ids for word in KNOWN_WORDS]
    assert all(len(i) == 1 for i in ids), [w for w, i in zip(KNOWN_WORDS, ids) if len(i) != 1]
    assert len({i[0] for i in ids}) == len(KNOWN_WORDS)
    assert {tokenizer.bos_token_id, tokenizer.eos_token_id}.isdisjoint(i[0] for i in ids)
    assert tokenizer.convert_ids_to_tokens(ids[KNOWN_WORDS.index("dog")]) == ["dog</w>"]
    assert len(tokenizer("kelly mckernan", add_special_tokens=False).input_ids) == 2


def test_sd2_pad_token():
    tok = make_clip_tokenizer(pad_token="!")
    pad_id = tok.convert_tokens_to_ids("!")
    assert tok.pad_token == "!" and tok.pad_token_id == pad_id != tok.eos_token_id
    enc = tok("a dog", padding="max_length", max_length=77, truncation=True)
    assert enc.input_ids[:4] == [tok.bos_token_id, *tok("a dog", add_special_tokens=False).input_ids, tok.eos_token_id]
    assert enc.input_ids[4:] == [pad_id] * 73
    assert enc.attention_mask == [1] * 4 + [0] * 73


@pytest.mark.parametrize("pad_token", ["<|endoftext|>", "!"])
def test_tokenizer_save_pretrained_round_trip(tmp_path, pad_token):
    tok = make_clip_tokenizer(pad_token=pad_token)
    tok.save_pretrained(tmp_path)
    loaded = CLIPTokenizer.from_pretrained(tmp_path)
    assert loaded.pad_token == pad_token and loaded.model_max_length == 77 and len(loaded) == len(tok)
    assert loaded.get_vocab() == tok.get_vocab()
    for text in ["a dog", "", *ODD_TEXTS]:
        expected = tok(text, padding="max_length", max_length=77, truncation=True)
        assert loaded(text, padding="max_length", max_length=77, truncation=True) == expected


def test_save_directory_holds_clip_vocab_and_merges(tmp_path, tokenizer):
    make_clip_tokenizer(tmp_path)
    vocab = json.loads((tmp_path / "vocab.json").read_text(encoding="utf-8"))
    merges = (tmp_path / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert vocab == tokenizer.get_vocab()
    assert sorted(vocab.values()) == list(range(len(vocab)))
    assert vocab["!"] == 0 and vocab["!</w>"] == 256 and vocab["dog</w>"] > 511
    assert list(vocab)[-2:] == ["<|startoftext|>", "<|endoftext|>"]
    assert merges[0].startswith("#version") and all(len(m.split(" ")) == 2 for m in merges[1:])
    assert all("".join(m.split(" ")) in vocab for m in merges[1:])
    reloaded = CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    assert reloaded("a painting of a dog").input_ids == tokenizer("a painting of a dog").input_ids


def test_tokenizer_is_deterministic(tokenizer):
    demo._vocab_and_merges.cache_clear()
    rebuilt = make_clip_tokenizer()
    assert rebuilt.get_vocab() == tokenizer.get_vocab()
    # The learned merges depend on the set of words only, not on their order (no hash-order tie-breaking).
    words = sorted(set(demo._WORDS.split()))
    shuffled = words[:]
    random.Random(0).shuffle(shuffled)
    assert demo._learn_merges(shuffled) == demo._learn_merges(words)


# --------------------------------------------------------------------------------------------- pipeline


def test_unknown_family_raises():
    with pytest.raises(ValueError, match="sd1.*sd2"):
        make_demo_pipeline("sdxl")


def test_components(pipe):
    sd2 = pipe.scheduler.config.prediction_type == "v_prediction"
    tok, text_encoder, unet = pipe.tokenizer, pipe.text_encoder, pipe.unet
    assert isinstance(text_encoder, CLIPTextModel) and isinstance(unet, UNet2DConditionModel)
    assert isinstance(pipe.vae, AutoencoderKL) and isinstance(pipe.scheduler, DDIMScheduler)
    assert pipe.safety_checker is None and pipe.feature_extractor is None
    assert pipe.config.requires_safety_checker is False

    cfg = text_encoder.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == ((48 if sd2 else 32), 2, 4)
    assert cfg.intermediate_size == 37 and cfg.max_position_embeddings == 77
    assert cfg.vocab_size == len(tok) == text_encoder.get_input_embeddings().num_embeddings
    assert (cfg.bos_token_id, cfg.eos_token_id) == (tok.bos_token_id, tok.eos_token_id)
    assert cfg.pad_token_id == tok.pad_token_id
    assert tok.pad_token == ("!" if sd2 else "<|endoftext|>")

    assert unet.config.cross_attention_dim == cfg.hidden_size
    attn2 = [m for name, m in unet.named_modules() if name.endswith("attn2")]
    assert len(attn2) >= 3
    assert all(m.to_k.in_features == m.to_v.in_features == cfg.hidden_size for m in attn2)
    assert unet.config.use_linear_projection is sd2
    assert isinstance(unet.config.attention_head_dim, (list, tuple)) is sd2

    sched = pipe.scheduler.config
    assert (sched.beta_start, sched.beta_end, sched.beta_schedule) == (0.00085, 0.012, "scaled_linear")
    assert sched.prediction_type == ("v_prediction" if sd2 else "epsilon")


def test_seeded_weights_and_global_rng_untouched():
    state = torch.random.get_rng_state()
    a, b, c = make_demo_pipeline(seed=0), make_demo_pipeline(seed=0), make_demo_pipeline(seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    for name in ("text_encoder", "unet", "vae"):
        sa, sb, sc = (getattr(p, name).state_dict() for p in (a, b, c))
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
        assert any(not torch.equal(sa[k], sc[k]) for k in sa if sa[k].is_floating_point() and sa[k].numel() > 1)


def test_runs_and_is_finite(pipe):
    # (no wall-clock assertion: shared 2-core machines are too noisy for one)
    outputs = [_run(pipe) for _ in range(2)]
    images = outputs[0]
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()
    assert np.array_equal(images, outputs[1])
    assert np.abs(images - _run(pipe, "a painting by van gogh")).max() > 1e-3  # the prompt conditions the UNet


def test_pipeline_save_pretrained_round_trip(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    loaded = StableDiffusionPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.tokenizer.pad_token == pipe.tokenizer.pad_token
    assert loaded.scheduler.config.prediction_type == pipe.scheduler.config.prediction_type
    assert np.array_equal(_run(loaded), _run(pipe))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_dtype_and_device(dtype):
    pipe = make_demo_pipeline("sd2", torch_dtype=dtype, device="cpu")
    ref = make_demo_pipeline("sd2")
    assert pipe.device.type == "cpu" and pipe.dtype == dtype and ref.dtype == torch.float32
    for name in ("text_encoder", "unet", "vae"):
        model, ref_model = getattr(pipe, name), getattr(ref, name)
        assert model.dtype == dtype and model.device.type == "cpu"
        # Same float32-drawn weights, only rounded.
        ref_state = ref_model.state_dict()
        assert all(torch.equal(v, ref_state[k].to(dtype)) for k, v in model.state_dict().items())


@torch.no_grad()
def test_text_encoder_is_causal_and_prompt_sensitive(pipe):
    tok, text_encoder = pipe.tokenizer, pipe.text_encoder

    def encode(prompt):
        ids = tok(prompt, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        return ids, text_encoder(ids).last_hidden_state

    ids, full = encode("a painting of a dog by van gogh")
    _, other = encode("a photo of a church")
    assert full.shape == (1, 77, text_encoder.config.hidden_size)
    torch.testing.assert_close(full[:, :2], other[:, :2], atol=1e-6, rtol=0)  # shared "<|startoftext|> a"
    delta = (full[0, 2:9] - other[0, 2:9]).norm(dim=-1) / full[0, 2:9].norm(dim=-1)
    assert delta.min() > 0.1  # every later position differs noticeably
    # Causality, checked in float64 so that matmul-shape-dependent float32 rounding (~1e-6) cannot hide a leak.
    text_encoder64 = copy.deepcopy(text_encoder).double()
    full64 = text_encoder64(ids).last_hidden_state
    for k in (0, 3, 8, 20):
        prefix64 = text_encoder64(ids[:, : k + 1]).last_hidden_state
        torch.testing.assert_close(prefix64, full64[:, : k + 1], atol=1e-6, rtol=0)
        prefix = text_encoder(ids[:, : k + 1]).last_hidden_state
        torch.testing.assert_close(prefix, full[:, : k + 1], atol=1e-5, rtol=0)

import copy
import json
import random

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiffusionPipeline,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    AutoTokenizer,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5EncoderModel,
    T5TokenizerFast,
)

from diffusers_uce.demo import DEMO_FAMILIES, make_clip_tokenizer, make_demo_pipeline, make_t5_tokenizer
from diffusers_uce.demo import tokenizers as demo_tokenizers

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


def _modules(pipe):
    return {name: c for name, c in pipe.components.items() if isinstance(c, torch.nn.Module)}


@pytest.fixture(scope="module")
def tokenizer():
    return make_clip_tokenizer()


SD_FAMILIES = ("sd1", "sd2")
NEW_FAMILIES = ("sdxl", "flux")


@pytest.fixture(scope="module", params=SD_FAMILIES)
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
    demo_tokenizers._vocab_and_merges.cache_clear()
    rebuilt = make_clip_tokenizer()
    assert rebuilt.get_vocab() == tokenizer.get_vocab()
    # The learned merges depend on the set of words only, not on their order (no hash-order tie-breaking).
    words = sorted(set(demo_tokenizers.WORDS.split()))
    shuffled = words[:]
    random.Random(0).shuffle(shuffled)
    assert demo_tokenizers._learn_merges(shuffled) == demo_tokenizers._learn_merges(words)


# --------------------------------------------------------------------------------------------- pipeline


def test_unknown_family_raises():
    assert DEMO_FAMILIES[:4] == SD_FAMILIES + NEW_FAMILIES  # the chat-LLM families: tests/demo/test_demo_llm.py
    with pytest.raises(ValueError, match="sd1.*sd2.*sdxl.*flux"):
        make_demo_pipeline("sd3")


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


@pytest.mark.parametrize("family", SD_FAMILIES + NEW_FAMILIES)
def test_seeded_weights_and_global_rng_untouched(family):
    state = torch.random.get_rng_state()
    a, b, c = (make_demo_pipeline(family, seed=seed) for seed in (0, 0, 1))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert len(_modules(a)) == (3 if family in SD_FAMILIES else 4)
    for name, module in _modules(a).items():
        sa, sb, sc = module.state_dict(), getattr(b, name).state_dict(), getattr(c, name).state_dict()
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


@pytest.mark.filterwarnings("ignore:`upcast_vae` is deprecated:FutureWarning")  # SDXL float16: VAE upcast
@pytest.mark.parametrize("family, dtype", [("sd2", torch.float64), ("sd2", torch.bfloat16), ("sdxl", torch.float16),
                                           ("sdxl", torch.bfloat16), ("flux", torch.float16),
                                           ("flux", torch.bfloat16)])
def test_dtype_and_device(family, dtype):
    pipe = make_demo_pipeline(family, torch_dtype=dtype, device="cpu")
    ref = make_demo_pipeline(family)
    assert pipe.device.type == "cpu" and pipe.dtype == dtype and ref.dtype == torch.float32
    for name, model in _modules(pipe).items():
        assert model.dtype == dtype and model.device.type == "cpu"
        # Same float32-drawn weights, only rounded.
        ref_state = getattr(ref, name).state_dict()
        assert all(torch.equal(v, ref_state[k].to(dtype)) for k, v in model.state_dict().items())
    images = _run(pipe)
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()
    if dtype.itemsize < 4:  # the same noise, only rounded (float64 latents draw other noise)
        assert np.abs(images - _run(ref)).max() < 0.1


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


# --------------------------------------------------------------------------------------------- T5 tokenizer (FLUX)


@pytest.fixture(scope="module")
def t5_tokenizer():
    return make_t5_tokenizer()


def test_t5_tokenizer_special_tokens_and_empty_text(t5_tokenizer):
    tok = t5_tokenizer
    assert isinstance(tok, T5TokenizerFast) and tok.model_max_length == 512
    assert (tok.pad_token, tok.eos_token, tok.unk_token) == ("<pad>", "</s>", "<unk>")
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    enc = tok("")
    assert enc.input_ids == [tok.eos_token_id] and enc.attention_mask == [1]


@pytest.mark.parametrize("prompt", ["a photo of Van Gogh", "a photo of van gogh", "Claude Monet", "a dog"])
def test_t5_tokenizer_one_id_per_word(t5_tokenizer, prompt):
    tok = t5_tokenizer
    ids = tok(prompt).input_ids
    words = prompt.split()
    assert len(ids) == len(words) + 1 and ids[-1] == tok.eos_token_id
    assert tok.unk_token_id not in ids and tok.pad_token_id not in ids
    assert tok.convert_ids_to_tokens(ids[:-1]) == ["\u2581" + word for word in words]
    assert ids[:-1] == [tok(w).input_ids[0] for w in words]
    assert tok.decode(ids, skip_special_tokens=True) == prompt
    enc = tok(prompt, padding="max_length", max_length=512, truncation=True)
    assert len(enc.input_ids) == 512 and sum(enc.attention_mask) == len(words) + 1
    assert enc.attention_mask[: len(words) + 1] == [1] * (len(words) + 1)
    assert set(enc.input_ids[len(words) + 1 :]) == {tok.pad_token_id}


def test_t5_tokenizer_is_case_sensitive_and_handles_any_text(t5_tokenizer):
    tok = t5_tokenizer
    assert tok("Van Gogh").input_ids != tok("van gogh").input_ids  # like T5, no lowercasing
    for text in ODD_TEXTS:
        ids = tok(text).input_ids
        assert len(ids) > 1 and ids[-1] == tok.eos_token_id and all(0 <= i < len(tok) for i in ids)
        if text.isascii():  # ASCII falls back to single characters, never to <unk>
            assert tok.unk_token_id not in ids
            assert tok.decode(ids, skip_special_tokens=True) == " ".join(text.split())
    ids = tok("a painting of a dog " * 200, truncation=True).input_ids
    assert len(ids) == 512 and ids[-1] == tok.eos_token_id


def test_t5_tokenizer_save_pretrained_round_trip(tmp_path, t5_tokenizer):
    make_t5_tokenizer(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
    texts = ["", "a photo of Van Gogh", "a painting of a dog by picasso", *ODD_TEXTS]
    for cls in (T5TokenizerFast, AutoTokenizer):
        loaded = cls.from_pretrained(tmp_path)
        assert loaded.model_max_length == 512 and len(loaded) == len(t5_tokenizer)
        assert loaded.get_vocab() == t5_tokenizer.get_vocab()
        for text in texts:
            expected = t5_tokenizer(text, padding="max_length", max_length=512, truncation=True)
            assert loaded(text, padding="max_length", max_length=512, truncation=True) == expected
    assert make_t5_tokenizer().get_vocab() == t5_tokenizer.get_vocab()  # deterministic


# --------------------------------------------------------------------------------------------- SDXL and FLUX


@pytest.fixture(scope="module", params=NEW_FAMILIES)
def new_pipe(request):
    return make_demo_pipeline(request.param)


def test_sdxl_components():
    pipe = make_demo_pipeline("sdxl")
    assert isinstance(pipe, StableDiffusionXLPipeline) and isinstance(pipe.scheduler, EulerDiscreteScheduler)
    assert isinstance(pipe.text_encoder, CLIPTextModel)
    assert isinstance(pipe.text_encoder_2, CLIPTextModelWithProjection)
    assert pipe.config.force_zeros_for_empty_prompt is True and pipe.watermark is None
    cfg, cfg_2 = pipe.text_encoder.config, pipe.text_encoder_2.config
    assert (cfg.hidden_size, cfg_2.hidden_size, cfg_2.projection_dim) == (32, 48, 16)
    assert (cfg.hidden_act, cfg_2.hidden_act) == ("quick_gelu", "gelu")
    assert (cfg.vocab_size, cfg_2.vocab_size) == (len(pipe.tokenizer), len(pipe.tokenizer_2))
    unet = pipe.unet.config
    assert unet.cross_attention_dim == 80 and unet.addition_embed_type == "text_time"
    assert unet.projection_class_embeddings_input_dim == 6 * unet.addition_time_embed_dim + cfg_2.projection_dim
    assert max(unet.transformer_layers_per_block) > 1
    attn2 = [m for name, m in pipe.unet.named_modules() if name.endswith("attn2")]
    assert len(attn2) == 8 and all(m.to_k.in_features == m.to_v.in_features == 80 for m in attn2)
    assert not any(m.training for m in _modules(pipe).values())


def test_sdxl_tokenizers_agree_but_pad_differently():
    pipe = make_demo_pipeline("sdxl")
    tok, tok_2 = pipe.tokenizer, pipe.tokenizer_2
    assert tok.pad_token == "<|endoftext|>" and tok_2.pad_token == "!" and tok_2.pad_token_id != tok_2.eos_token_id
    for prompt in ["", "a dog", "a photo of Van Gogh", "a painting of a church by claude monet, trending", *ODD_TEXTS]:
        enc = tok(prompt, padding="max_length", max_length=77, truncation=True)
        enc_2 = tok_2(prompt, padding="max_length", max_length=77, truncation=True)
        n = sum(enc.attention_mask)
        assert sum(enc_2.attention_mask) == n and enc_2.input_ids[:n] == enc.input_ids[:n]
        assert set(enc_2.input_ids[n:]) <= {tok_2.pad_token_id} and set(enc.input_ids[n:]) <= {tok.eos_token_id}
    # force_zeros_for_empty_prompt: without a negative prompt, the unconditional embeddings are zeros.
    with torch.no_grad():
        _, negative, _, negative_pooled = pipe.encode_prompt("a dog", device="cpu", do_classifier_free_guidance=True)
    assert negative.shape == (1, 77, 80) and not negative.any() and not negative_pooled.any()


def test_flux_components():
    pipe = make_demo_pipeline("flux")
    assert isinstance(pipe, FluxPipeline) and isinstance(pipe.transformer, FluxTransformer2DModel)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    assert isinstance(pipe.text_encoder, CLIPTextModel) and isinstance(pipe.text_encoder_2, T5EncoderModel)
    assert isinstance(pipe.tokenizer_2, T5TokenizerFast) and pipe.tokenizer_2.model_max_length == 512
    clip, t5, transformer = pipe.text_encoder.config, pipe.text_encoder_2.config, pipe.transformer
    assert (clip.hidden_size, t5.d_model, t5.vocab_size, t5.dropout_rate) == (48, 64, len(pipe.tokenizer_2), 0.0)
    assert transformer.context_embedder.weight.shape == (32, 64)
    assert transformer.time_text_embed.text_embedder.linear_1.weight.shape == (32, 48)
    assert transformer.config.in_channels == 4 * pipe.vae.config.latent_channels == 64
    assert sum(transformer.config.axes_dims_rope) == transformer.config.attention_head_dim
    assert not any(m.training for m in _modules(pipe).values())
    with torch.no_grad():
        prompt_embeds, pooled, text_ids = pipe.encode_prompt("a photo of Van Gogh", prompt_2=None, device="cpu")
    assert prompt_embeds.shape == (1, 512, 64) and pooled.shape == (1, 48) and text_ids.shape == (512, 3)


def test_new_family_runs(new_pipe):
    outputs = [_run(new_pipe) for _ in range(2)]
    images = outputs[0]
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()
    assert np.array_equal(images, outputs[1])
    assert np.abs(images - _run(new_pipe, "a painting by van gogh")).max() > 1e-3  # the prompt conditions the model
    default = new_pipe("a cat", num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0))
    assert default.images.shape == (1, 32, 32, 3)  # 32x32 by default


def test_new_family_save_pretrained_round_trip(new_pipe, tmp_path):
    new_pipe.save_pretrained(tmp_path)
    loaded = DiffusionPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded) is type(new_pipe)
    for name, module in _modules(new_pipe).items():
        state, loaded_state = module.state_dict(), getattr(loaded, name).state_dict()
        assert loaded_state.keys() == state.keys() and all(torch.equal(loaded_state[k], state[k]) for k in state)
    for name in ("tokenizer", "tokenizer_2"):
        tok, loaded_tok = getattr(new_pipe, name), getattr(loaded, name)
        assert type(loaded_tok) is type(tok) and loaded_tok.pad_token == tok.pad_token
        for text in ["", "a photo of Van Gogh", *ODD_TEXTS]:
            assert loaded_tok(text).input_ids == tok(text).input_ids
    # Not bit-exact: weights loaded from safetensors are memory-mapped at unaligned addresses, and float32 GEMV
    # kernels round differently there (~1e-7).
    np.testing.assert_allclose(_run(loaded), _run(new_pipe), atol=1e-5, rtol=0)

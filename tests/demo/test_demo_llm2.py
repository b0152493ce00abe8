import inspect

import pytest
import torch
from diffusers import (
    AutoencoderDC,
    AutoencoderKL,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    HiDreamImagePipeline,
    HiDreamImageTransformer2DModel,
    SanaPipeline,
    SanaTransformer2DModel,
)
from transformers import (
    CLIPTextModelWithProjection,
    Gemma2Model,
    GemmaTokenizer,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    T5EncoderModel,
)

from diffusers_uce.demo import DEMO_FAMILIES, make_demo_pipeline
from diffusers_uce.demo.hidream import make_llama_tokenizer
from diffusers_uce.demo.sana import make_gemma_tokenizer

FAMILIES = ("sana", "hidream")
LATENT_SHAPES = {"sana": (1, 32, 16, 16), "hidream": (1, 16, 16, 16)}
# The instruction SanaPipeline prepends to every prompt by default.
SANA_INSTRUCTION = inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default


@pytest.fixture(scope="module")
def sana():
    return make_demo_pipeline("sana")


@pytest.fixture(scope="module")
def hidream():
    return make_demo_pipeline("hidream")


@pytest.fixture(scope="module", params=FAMILIES)
def family_pipe(request):
    return request.param, request.getfixturevalue(request.param)


def _latents(pipe, prompt="a photo of a cat", seed=0):
    generator = torch.Generator().manual_seed(seed)
    return pipe(prompt=prompt, num_inference_steps=2, output_type="latent", generator=generator).images


def _modules(pipe):
    return {name: c for name, c in pipe.components.items() if isinstance(c, torch.nn.Module)}


def test_families_registered():
    assert set(FAMILIES) <= set(DEMO_FAMILIES)


def test_call_runs_and_is_deterministic(family_pipe):
    family, pipe = family_pipe
    torch.set_num_threads(1)
    latents = _latents(pipe)
    assert latents.shape == LATENT_SHAPES[family] and torch.isfinite(latents).all()
    assert torch.equal(latents, _latents(pipe))
    assert (latents - _latents(pipe, "a painting by van gogh")).abs().max() > 1e-3  # the prompt conditions it


def test_weights_are_seeded(family_pipe):
    family, pipe = family_pipe
    state = torch.random.get_rng_state()
    same, other = make_demo_pipeline(family, seed=0), make_demo_pipeline(family, seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is left untouched
    for name, module in _modules(pipe).items():
        reference, rebuilt, reseeded = module.state_dict(), _modules(same)[name].state_dict(), _modules(other)[name]
        assert all(torch.equal(reference[key], rebuilt[key]) for key in reference), name
        assert any(not torch.equal(reference[key], value) for key, value in reseeded.state_dict().items()), name
    assert not any(module.training for module in _modules(pipe).values())


# --------------------------------------------------------------------------------------------- Sana


def test_sana_components(sana):
    assert isinstance(sana, SanaPipeline) and isinstance(sana.text_encoder, Gemma2Model)
    assert isinstance(sana.tokenizer, GemmaTokenizer) and isinstance(sana.vae, AutoencoderDC)
    assert isinstance(sana.transformer, SanaTransformer2DModel)
    scheduler = sana.scheduler
    assert isinstance(scheduler, DPMSolverMultistepScheduler) and scheduler.config.use_flow_sigmas
    assert scheduler.config.prediction_type == "flow_prediction" and scheduler.config.flow_shift == 3.0
    gemma, transformer = sana.text_encoder.config, sana.transformer
    assert gemma.vocab_size == len(sana.tokenizer) and gemma.num_hidden_layers == 2
    assert gemma.layer_types == ["sliding_attention", "full_attention"]
    assert transformer.config.caption_channels == gemma.hidden_size == 48
    assert transformer.caption_projection.linear_1.weight.shape == (32, 48)
    assert sana.vae_scale_factor == 32 and transformer.config.in_channels == sana.vae.config.latent_channels == 32
    blocks = transformer.transformer_blocks
    assert len(blocks) == 2
    for block in blocks:
        for linear in (block.attn2.to_k, block.attn2.to_v):
            assert linear.in_features == 32 and linear.bias is not None


def test_sana_tokenizer_is_gemma_like():
    tokenizer = make_gemma_tokenizer()
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.unk_token_id) == (
        0, 1, 2, 3
    )
    ids = tokenizer("a photo of van gogh").input_ids
    assert tokenizer.convert_ids_to_tokens(ids) == ["<bos>", "a", "\u2581photo", "\u2581of", "\u2581van", "\u2581gogh"]
    assert len(tokenizer(" Van", add_special_tokens=False).input_ids) > 1  # case-sensitive: "Van" is not a word
    for text in ["", "ñandú 日本の絵 🙂", "Given a user prompt,\nUser Prompt: "]:
        ids = tokenizer(text).input_ids
        assert ids[0] == tokenizer.bos_token_id and tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_sana_keeps_bos_and_the_prompt_after_the_instruction(sana):
    tokenizer, prompt = sana.tokenizer, "a photo of a cat"
    with torch.no_grad():
        embeds, mask, negative, negative_mask = sana.encode_prompt(
            prompt, device="cpu", complex_human_instruction=SANA_INSTRUCTION
        )
    assert embeds.shape == negative.shape == (1, 300, 48) and mask.shape == negative_mask.shape == (1, 300)
    # The pipeline keeps position 0 and the last 299 of (instruction tokens + 298): "<bos>", then the prompt's tokens
    # (the instruction's trailing "▁" is absorbed into the prompt's first word), then padding.
    prompt_ids = tokenizer(" " + prompt, add_special_tokens=False).input_ids
    instruction = "\n".join(SANA_INSTRUCTION)
    ids = tokenizer(instruction + prompt, padding="max_length", max_length=len(tokenizer.encode(instruction)) + 298)
    kept = [ids.input_ids[0], *ids.input_ids[-299:]]
    assert kept[: len(prompt_ids) + 2] == [tokenizer.bos_token_id, *prompt_ids, tokenizer.pad_token_id]
    assert mask[0].tolist() == [1] * (len(prompt_ids) + 1) + [0] * (299 - len(prompt_ids))
    with torch.no_grad():
        full = sana.text_encoder(torch.tensor([ids.input_ids]), attention_mask=torch.tensor([ids.attention_mask]))
    torch.testing.assert_close(embeds, full.last_hidden_state[:, [0, *range(-299, 0)]])
    assert negative_mask.sum() == 1  # the negative prompt "" has no instruction: "<bos>" alone


# --------------------------------------------------------------------------------------------- HiDream


def test_hidream_components(hidream):
    assert isinstance(hidream, HiDreamImagePipeline) and isinstance(hidream.vae, AutoencoderKL)
    assert isinstance(hidream.transformer, HiDreamImageTransformer2DModel)
    assert isinstance(hidream.scheduler, FlowMatchEulerDiscreteScheduler)
    assert isinstance(hidream.text_encoder, CLIPTextModelWithProjection)
    assert isinstance(hidream.text_encoder_2, CLIPTextModelWithProjection)
    assert isinstance(hidream.text_encoder_3, T5EncoderModel) and isinstance(hidream.text_encoder_4, LlamaForCausalLM)
    assert isinstance(hidream.tokenizer_4, PreTrainedTokenizerFast)
    assert hidream.tokenizer_4.pad_token == hidream.tokenizer_4.eos_token == "<|eot_id|>"
    transformer, llama = hidream.transformer, hidream.text_encoder_4.config
    config = transformer.config
    assert len(transformer.double_stream_blocks) == len(transformer.single_stream_blocks) == 2
    assert config.llama_layers == [0, 1, 2, 2] and max(config.llama_layers) < llama.num_hidden_layers == 3
    projections = [p.linear for p in transformer.caption_projection]
    assert [p.in_features for p in projections] == [48] * 4 + [64]  # Llama for each block, then T5
    assert all(p.bias is None and p.out_features == 32 for p in projections)
    pooled_width = hidream.text_encoder.config.projection_dim + hidream.text_encoder_2.config.projection_dim
    assert transformer.p_embedder.pooled_embedder.linear_1.in_features == pooled_width == 80


def test_hidream_encode_prompt_shapes(hidream):
    with torch.no_grad():
        t5, _, llama, _, pooled, _ = hidream.encode_prompt("a photo of a cat", device="cpu")
    assert t5.shape == (1, 128, 64) and llama.shape == (3, 1, 128, 48) and pooled.shape == (1, 80)
    ids = hidream.tokenizer_4("a photo of a cat", padding="max_length", max_length=128, return_tensors="pt")
    with torch.no_grad():
        out = hidream.text_encoder_4(**ids, output_hidden_states=True)
    torch.testing.assert_close(llama, torch.stack(out.hidden_states[1:]))  # every layer, the last one normalised


def test_llama_tokenizer_is_llama3_like():
    tokenizer = make_llama_tokenizer()
    ids = tokenizer("a photo of Van Gogh").input_ids
    assert tokenizer.convert_ids_to_tokens(ids) == ["<|begin_of_text|>", "a", "Ġphoto", "Ġof", "ĠVan", "ĠGogh"]
    assert tokenizer.bos_token_id == len(tokenizer) - 5  # special tokens come after the BPE vocabulary
    for text in ["", "ñandú 日本の絵 🙂", "x" * 40]:
        ids = tokenizer(text).input_ids
        assert ids[0] == tokenizer.bos_token_id and tokenizer.decode(ids, skip_special_tokens=True) == text

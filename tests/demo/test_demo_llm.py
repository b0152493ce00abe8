import pytest
import torch
from diffusers import Flux2KleinPipeline, Flux2Pipeline, QwenImagePipeline
from diffusers.pipelines.flux2.pipeline_flux2 import format_input
from transformers import Qwen2Tokenizer

from diffusers_uce.demo import DEMO_FAMILIES, make_demo_pipeline
from diffusers_uce.demo.chat_tokenizers import byte_level_vocab_and_merges, make_qwen2_tokenizer
from diffusers_uce.demo.qwenimage import QWENIMAGE_PROMPT_TEMPLATE

# family -> (pipeline class, shape of the latents of one 32x32 image, width of the transformer's text input)
LLM_FAMILIES = {
    "qwenimage": (QwenImagePipeline, (1, 16, 64), 32),  # 4x4 tokens of 16 channels x 2x2
    "flux2": (Flux2Pipeline, (1, 64, 128), 48),  # 8x8 tokens of 32 channels x 2x2; 3 stacked layers of 16
    "flux2-klein": (Flux2KleinPipeline, (1, 32, 16, 16), 48),  # unpacked latents
}
PROMPT = "a photo of a cat"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=list(LLM_FAMILIES))
def family_pipe(request):
    return request.param, make_demo_pipeline(request.param)


def _latents(pipe, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return pipe(prompt=PROMPT, num_inference_steps=2, output_type="latent", generator=generator).images


def test_families_are_registered():
    assert set(LLM_FAMILIES) <= set(DEMO_FAMILIES)


def test_class_call_and_latent_shape(family_pipe):
    family, pipe = family_pipe
    cls, shape, text_width = LLM_FAMILIES[family]
    assert type(pipe) is cls
    latents = _latents(pipe)
    assert latents.shape == shape and torch.isfinite(latents).all()
    reader = pipe.transformer.txt_in if family == "qwenimage" else pipe.transformer.context_embedder
    assert reader.in_features == text_width
    # Same weights and same generator: the same latents; another generator: different ones.
    assert torch.equal(_latents(pipe), latents)
    assert not torch.equal(_latents(pipe, seed=1), latents)


def test_weights_are_deterministic_per_seed(family_pipe):
    family, pipe = family_pipe
    same, other = make_demo_pipeline(family, seed=0), make_demo_pipeline(family, seed=1)
    rng = torch.random.get_rng_state()
    for name in ("text_encoder", "transformer", "vae"):
        ours, theirs, others = (dict(p.components[name].state_dict()) for p in (pipe, same, other))
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)
        assert any(not torch.equal(ours[k], others[k]) for k in ours if ours[k].is_floating_point())
    assert torch.equal(torch.random.get_rng_state(), rng)


def test_flux2_text_input_stacks_three_intermediate_layers(family_pipe):
    family, pipe = family_pipe
    if family == "qwenimage":
        pytest.skip("Qwen-Image reads the last hidden state only")
    layers = (10, 20, 30) if family == "flux2" else (9, 18, 27)
    embeds, text_ids = pipe.encode_prompt(PROMPT, device="cpu")
    assert embeds.shape == (1, 512, 48) and text_ids.shape == (1, 512, 4)
    # The pipeline's default layers are intermediate ones of the text model, as in the real models.
    assert max(layers) < pipe.text_encoder.config.get_text_config().num_hidden_layers
    again, _ = pipe.encode_prompt(PROMPT, device="cpu", text_encoder_out_layers=layers[::-1])
    assert torch.equal(again[..., :16], embeds[..., 32:])


def test_qwenimage_drops_the_system_template_and_keeps_the_prompt():
    tokenizer = make_qwen2_tokenizer([QWENIMAGE_PROMPT_TEMPLATE.format("")])
    assert isinstance(tokenizer, Qwen2Tokenizer)
    prefix = QWENIMAGE_PROMPT_TEMPLATE.split("{}")[0]
    # The pipeline drops prompt_template_encode_start_idx = 34 tokens: exactly the system turn and "user\n".
    assert len(tokenizer(prefix).input_ids) == 34
    tokens = tokenizer.convert_ids_to_tokens(tokenizer(QWENIMAGE_PROMPT_TEMPLATE.format(PROMPT)).input_ids)
    assert tokens[34:] == ["a", "Ġphoto", "Ġof", "Ġa", "Ġcat", "<|im_end|>", "Ċ", "<|im_start|>", "assistant", "Ċ"]
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.padding_side == "right"


def test_qwenimage_encode_prompt_trims_and_masks():
    pipe = make_demo_pipeline("qwenimage")
    embeds, mask = pipe.encode_prompt([PROMPT, "a cat"], device="cpu")
    assert embeds.shape == (2, 10, 32)  # 5 prompt tokens + 5 suffix tokens; the shorter one padded with zeros
    assert mask.tolist() == [[1] * 10, [1] * 7 + [0] * 3]
    assert torch.all(embeds[1, 7:] == 0)


def test_flux2_chat_format_and_left_padding():
    pipe = make_demo_pipeline("flux2")
    tokenizer = pipe.tokenizer
    inputs = tokenizer.apply_chat_template(
        format_input([PROMPT], system_message=pipe.system_message), add_generation_prompt=False, tokenize=True,
        return_dict=True, return_tensors="pt", padding="max_length", truncation=True, max_length=512,
    )
    mask = inputs["attention_mask"][0]
    n = int(mask.sum())
    assert mask[-n:].all() and not mask[:-n].any()  # padded on the left, as Mistral's tokenizer
    tokens = tokenizer.convert_ids_to_tokens(inputs["input_ids"][0, -n:].tolist())
    assert tokens[:3] == ["<s>", "[SYSTEM_PROMPT]", "You"]
    assert tokens[-8:] == ["[/SYSTEM_PROMPT]", "[INST]", "a", "Ġphoto", "Ġof", "Ġa", "Ġcat", "[/INST]"]
    assert tokenizer.convert_tokens_to_ids(["[IMG]", "<pad>", "[SYSTEM_PROMPT]"]) == [10, 11, 17]


def test_flux2_klein_chat_format():
    tokenizer = make_demo_pipeline("flux2-klein").tokenizer
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    assert text == f"<|im_start|>user\n{PROMPT}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    tokens = tokenizer.convert_ids_to_tokens(tokenizer(text).input_ids)
    assert tokens[:3] == ["<|im_start|>", "user", "Ċ"]
    assert tokens[-9:] == ["<|im_end|>", "Ċ", "<|im_start|>", "assistant", "Ċ", "<think>", "ĊĊ", "</think>", "ĊĊ"]


@pytest.mark.parametrize("text", ["zxqvj fnordle", "ñandú über café", "日本の絵 🙂🎨", "C'est l'été, isn't it"])
def test_any_text_round_trips(text):
    tokenizer = make_qwen2_tokenizer()
    assert tokenizer.decode(tokenizer(text).input_ids) == text


def test_vocabulary_is_deterministic_and_whole_words():
    vocab, merges = byte_level_vocab_and_merges(["Hello world"], ["<|a|>"])
    assert (vocab, merges) == byte_level_vocab_and_merges(["Hello world"], ["<|a|>"])
    assert {"Hello", "Ġworld", "Ġcat", "cat", "ĠCat", "<|a|>"} <= set(vocab)
    assert vocab["<|a|>"] == len(vocab) - 1
    assert byte_level_vocab_and_merges(special_tokens=["<|a|>"], specials_first=True)[0]["<|a|>"] == 0

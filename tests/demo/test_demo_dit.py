"""The DiT demo families: SD3, PixArt-Σ / α, Wan and CogVideoX."""

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLCogVideoX,
    AutoencoderKLWan,
    CogVideoXDPMScheduler,
    CogVideoXPipeline,
    CogVideoXTransformer3DModel,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    PixArtAlphaPipeline,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    UniPCMultistepScheduler,
    WanPipeline,
    WanTransformer3DModel,
)
from transformers import CLIPTextModelWithProjection, T5EncoderModel, UMT5EncoderModel

from diffusers_uce.demo import DEMO_FAMILIES, make_demo_pipeline

DIT_FAMILIES = ("sd3", "pixart", "pixart-alpha", "wan", "cogvideox")
# family: (pipeline class, transformer class, VAE class, scheduler class, text encoder classes)
CLASSES = {
    "sd3": (StableDiffusion3Pipeline, SD3Transformer2DModel, AutoencoderKL, FlowMatchEulerDiscreteScheduler,
            (CLIPTextModelWithProjection, CLIPTextModelWithProjection, T5EncoderModel)),
    "pixart": (PixArtSigmaPipeline, PixArtTransformer2DModel, AutoencoderKL, DPMSolverMultistepScheduler,
               (T5EncoderModel,)),
    "pixart-alpha": (PixArtAlphaPipeline, PixArtTransformer2DModel, AutoencoderKL, DPMSolverMultistepScheduler,
                     (T5EncoderModel,)),
    "wan": (WanPipeline, WanTransformer3DModel, AutoencoderKLWan, UniPCMultistepScheduler, (UMT5EncoderModel,)),
    "cogvideox": (CogVideoXPipeline, CogVideoXTransformer3DModel, AutoencoderKLCogVideoX, CogVideoXDPMScheduler,
                  (T5EncoderModel,)),
}
# Extra call arguments (Wan hard-codes 81 frames of 480x832) and the latents the call returns.
CALL_KWARGS = {"wan": dict(num_frames=5, height=32, width=32)}
LATENT_SHAPES = {
    "sd3": (1, 16, 16, 16),
    "pixart": (1, 4, 32, 32),  # 256x256 after PixArt's resolution binning, 8x VAE
    "pixart-alpha": (1, 4, 32, 32),
    "wan": (1, 16, 2, 4, 4),  # (batch, channels, frames, height, width)
    "cogvideox": (1, 3, 16, 4, 4),  # (batch, frames, channels, height, width)
}
TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")


def _modules(pipe):
    return {name: c for name, c in pipe.components.items() if isinstance(c, torch.nn.Module)}


def _latents(pipe, family, prompt="a photo of a cat"):
    kwargs = dict(CALL_KWARGS.get(family, {}), num_inference_steps=2, output_type="latent")
    if family.startswith("pixart"):
        kwargs["clean_caption"] = False  # needs beautifulsoup4 and ftfy, else warns
    out = pipe(prompt=prompt, generator=torch.Generator().manual_seed(0), **kwargs)
    return out.frames if family in ("wan", "cogvideox") else out.images


@pytest.fixture(scope="module", params=DIT_FAMILIES)
def family_pipe(request):
    return request.param, make_demo_pipeline(request.param)


def test_families_are_registered():
    assert set(DIT_FAMILIES) <= set(DEMO_FAMILIES)


def test_classes(family_pipe):
    family, pipe = family_pipe
    pipeline_class, transformer_class, vae_class, scheduler_class, encoder_classes = CLASSES[family]
    assert type(pipe) is pipeline_class and type(pipe.transformer) is transformer_class
    assert type(pipe.vae) is vae_class and type(pipe.scheduler) is scheduler_class
    encoders = [getattr(pipe, name) for name in TEXT_ENCODERS if getattr(pipe, name, None) is not None]
    assert tuple(type(encoder) for encoder in encoders) == encoder_classes
    assert not any(m.training for m in _modules(pipe).values())


@pytest.mark.parametrize("family", DIT_FAMILIES)
def test_seeded_weights_and_global_rng_untouched(family):
    state = torch.random.get_rng_state()
    a, b, c = (make_demo_pipeline(family, seed=seed) for seed in (0, 0, 1))
    assert torch.equal(torch.random.get_rng_state(), state)
    for name, module in _modules(a).items():
        sa, sb, sc = module.state_dict(), getattr(b, name).state_dict(), getattr(c, name).state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
        assert any(not torch.equal(sa[k], sc[k]) for k in sa if sa[k].is_floating_point() and sa[k].numel() > 1)


@torch.no_grad()
def test_call_returns_latents(family_pipe):
    family, pipe = family_pipe
    latents = _latents(pipe, family)
    assert tuple(latents.shape) == LATENT_SHAPES[family] and torch.isfinite(latents).all()
    assert torch.equal(latents, _latents(pipe, family))
    assert (latents - _latents(pipe, family, "a painting by van gogh")).abs().max() > 1e-4  # the prompt conditions


@torch.no_grad()
def test_sd3_text_paths():
    pipe = make_demo_pipeline("sd3")
    transformer = pipe.transformer
    widths = [pipe.text_encoder.config.hidden_size, pipe.text_encoder_2.config.hidden_size]
    assert widths == [32, 48] and pipe.text_encoder_3.config.d_model == 96 > sum(widths)
    assert [pipe.text_encoder.config.projection_dim, pipe.text_encoder_2.config.projection_dim] == [16, 24]
    assert (pipe.tokenizer.pad_token, pipe.tokenizer_2.pad_token) == ("<|endoftext|>", "!")
    assert transformer.context_embedder.weight.shape == (32, 96)
    assert transformer.time_text_embed.text_embedder.linear_1.weight.shape == (32, 40)
    first, last = transformer.transformer_blocks
    assert first.use_dual_attention and first.attn2 is not None  # SD 3.5 Medium's extra image self-attention
    assert last.context_pre_only and not last.use_dual_attention
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt("a photo of a cat", None, None, device="cpu")
    assert embeds.shape == negative.shape == (1, 77 + 256, 96) and pooled.shape == negative_pooled.shape == (1, 40)
    assert not embeds[:, :77, 80:].any() and embeds[:, 77:, 80:].any()  # CLIP zero-padded to T5's width


@pytest.mark.parametrize("family, max_length", [("pixart", 300), ("pixart-alpha", 120)])
@torch.no_grad()
def test_pixart_text_path(family, max_length):
    pipe = make_demo_pipeline(family)
    transformer = pipe.transformer
    assert transformer.caption_projection.linear_1.weight.shape == (32, 64)
    attn2 = [block.attn2 for block in transformer.transformer_blocks]
    assert len(attn2) == 2 and all(a.to_k.in_features == a.to_v.in_features == 32 for a in attn2)
    embeds, mask, negative, negative_mask = pipe.encode_prompt("a photo of a cat", device="cpu")
    assert embeds.shape == negative.shape == (1, max_length, 64) and mask.shape == (1, max_length)
    assert mask.sum() == negative_mask.sum() + 5 == 6  # 5 words and "</s>"; "" is "</s>" alone


@torch.no_grad()
def test_wan_text_path():
    pipe = make_demo_pipeline("wan")
    transformer = pipe.transformer
    assert transformer.condition_embedder.text_embedder.linear_1.weight.shape == (32, 64)
    attn2 = [block.attn2 for block in transformer.blocks]
    assert len(attn2) == 2 and all(a.to_k.in_features == a.to_v.in_features == 32 for a in attn2)
    assert all(a.add_k_proj is None for a in attn2)  # text-to-video: no image context
    embeds, negative = pipe.encode_prompt("a photo of a cat", device="cpu")
    assert embeds.shape == negative.shape == (1, 226, 64)
    # Wan keeps the real tokens (5 words and "</s>") and zeroes the rest.
    assert embeds[0, :6].abs().sum(-1).min() > 0 and not embeds[0, 6:].any()


@torch.no_grad()
def test_cogvideox_text_path():
    pipe = make_demo_pipeline("cogvideox")
    assert pipe.transformer.patch_embed.text_proj.weight.shape == (32, 64)
    assert len(pipe.transformer.transformer_blocks) == 2
    embeds, negative = pipe.encode_prompt("a photo of a cat", device="cpu")
    assert embeds.shape == negative.shape == (1, 226, 64)
    assert embeds[0].abs().sum(-1).min() > 0  # the padding is encoded too, unmasked


@torch.no_grad()
def test_save_pretrained_round_trip(family_pipe, tmp_path):
    family, pipe = family_pipe
    pipe.save_pretrained(tmp_path)
    loaded = DiffusionPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded) is type(pipe)
    for name, module in _modules(pipe).items():
        state, loaded_state = module.state_dict(), getattr(loaded, name).state_dict()
        assert loaded_state.keys() == state.keys() and all(torch.equal(loaded_state[k], state[k]) for k in state)
    for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        if getattr(pipe, name, None) is not None:
            assert getattr(loaded, name)("a photo of Van Gogh").input_ids == getattr(pipe, name)(
                "a photo of Van Gogh").input_ids
    # Not bit-exact in general: memory-mapped safetensors weights can round differently (~1e-7).
    torch.testing.assert_close(_latents(loaded, family), _latents(pipe, family), atol=1e-5, rtol=0)

"""Pipelines with real model shapes and random weights for benchmarks/edit_speed.py, and a plain per-family description
of their target layers (what the benchmark's float64 baseline edits, written independently of the package).

Families: ``"sd15"`` (SD 1.5: CLIP ViT-L, the SD 1.5 UNet), ``"sdxl"`` (SDXL 1.0 base: CLIP ViT-L + OpenCLIP bigG, the
SDXL UNet) and ``"flux"`` (FLUX.1-dev: CLIP ViT-L pooled + a T5-XXL-shaped encoder, the FLUX transformer). Text
towers are materialised with seeded random weights; the denoiser is built on the meta device and only the layers an
edit reads are materialised (seeded ``nn.Linear`` default init): the UNet's attn2 ``to_k``/``to_v``, FLUX's
``context_embedder`` and ``time_text_embed.text_embedder.linear_1`` (with their biases). No VAE. ``tiny=True`` gives
the same code path with tiny widths (for the smoke test).
"""

from __future__ import annotations

import math

import torch
from diffusers import (
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from diffusers_uce.demo import make_clip_tokenizer, make_t5_tokenizer

FAMILIES = ("sd15", "sdxl", "flux")
TITLES = {"sd15": "SD 1.5", "sdxl": "SDXL", "flux": "FLUX"}

# Text towers: (CLIPTextConfig / T5Config keyword arguments). The real configs of the checkpoints named.
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              hidden_act="quick_gelu", projection_dim=768)  # openai/clip-vit-large-patch14
CLIP_BIGG = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                 hidden_act="gelu", projection_dim=1280)  # SDXL text_encoder_2 (OpenCLIP ViT-bigG/14)
T5_XXL = dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, relative_attention_num_buckets=32,
              relative_attention_max_distance=128, vocab_size=32128)  # google/t5-v1_1-xxl (FLUX text_encoder_2)
TINY_CLIP = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                 hidden_act="quick_gelu", projection_dim=32)
TINY_CLIP_2 = dict(TINY_CLIP, hidden_size=48, hidden_act="gelu", projection_dim=16)
TINY_T5 = dict(d_model=64, d_kv=8, d_ff=37, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
               relative_attention_max_distance=32, vocab_size=None)  # vocab_size None: the tokenizer's

# Denoisers (built on the meta device).
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SDXL_UNET = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
                 cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)  # stabilityai/stable-diffusion-xl-base-1.0
FLUX_TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                        guidance_embeds=True, axes_dims_rope=(16, 56, 56))  # black-forest-labs/FLUX.1-dev
TINY_UNET = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4), norm_num_groups=8)
TINY_SDXL_UNET = dict(TINY_UNET, transformer_layers_per_block=(1, 2), use_linear_projection=True,
                      cross_attention_dim=80, addition_embed_type="text_time", addition_time_embed_dim=8,
                      projection_class_embeddings_input_dim=6 * 8 + 16)
TINY_FLUX_TRANSFORMER = dict(FLUX_TRANSFORMER, num_layers=1, num_single_layers=1, attention_head_dim=16,
                             num_attention_heads=2, joint_attention_dim=64, pooled_projection_dim=32,
                             axes_dims_rope=(4, 4, 8))

ATTN2 = ("attn2.to_k", "attn2.to_v")
FLUX_LAYERS = ("context_embedder", "time_text_embed.text_embedder.linear_1")


# ---------------------------------------------------------------- building
def clip_text_model(tokenizer, spec: dict, seed: int, device, with_projection: bool = False, tiny: bool = False):
    """A seeded CLIP text tower; the vocabulary is CLIP's 49408 rows (the tokenizer's size when `tiny`)."""
    config = CLIPTextConfig(
        vocab_size=len(tokenizer) if tiny else 49408, max_position_embeddings=77, layer_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        **spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)
    return model.eval().to(device)


def t5_model(tokenizer, spec: dict, num_layers: int, seed: int, device):
    """A seeded T5 v1.1 encoder (gated GELU, untied embeddings) of `spec`'s shapes with `num_layers` layers."""
    spec = dict(spec, num_layers=num_layers, vocab_size=spec["vocab_size"] or len(tokenizer))
    config = T5Config(feed_forward_proj="gated-gelu", dropout_rate=0.0, tie_word_embeddings=False,
                      layer_norm_epsilon=1e-6, pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id, **spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = T5EncoderModel(config)
    return model.eval().to(device)


def meta_denoiser(cls, config: dict, names: tuple[str, ...], seed: int, device, suffix: bool = True):
    """`cls(**config)` on the meta device with the linear layers named by `names` (name suffixes when `suffix`, exact
    names otherwise) materialised in module order with ``nn.Linear``'s default init, drawn from one seeded
    generator."""
    with torch.device("meta"):
        model = cls(**config)
    generator = torch.Generator().manual_seed(seed)
    for name, module in model.named_modules():
        if name.endswith(names) if suffix else name in names:
            bound = 1 / math.sqrt(module.in_features)
            for param in ("weight", "bias"):
                if getattr(module, param) is not None:
                    value = (torch.rand(getattr(module, param).shape, generator=generator) * 2 - 1) * bound
                    setattr(module, param, torch.nn.Parameter(value.to(device), requires_grad=False))
    return model


def build_pipeline(family: str, device="cpu", seed: int = 0, *, tiny: bool = False, text_layers: int | None = None):
    """A `family`-shaped pipeline (see the module docstring), not yet attached.

    Args:
        family (`str`): ``"sd15"``, ``"sdxl"`` or ``"flux"``.
        tiny (`bool`, defaults to `False`): tiny widths and depths, the same code path.
        text_layers (`int`, *optional*): depth of the second text tower: SDXL's bigG (32 by default, its real depth)
            or FLUX's T5 (2 by default: the real 24 layers are 4.7B parameters). Ignored for ``"sd15"``.
    """
    clip = make_clip_tokenizer()  # pads with "<|endoftext|>", as SD 1.5's, SDXL's first and FLUX's CLIP tokenizers
    text_encoder = clip_text_model(clip, TINY_CLIP if tiny else CLIP_L, seed, device, tiny=tiny)
    if family == "sd15":
        unet = meta_denoiser(UNet2DConditionModel, dict(TINY_UNET, cross_attention_dim=32) if tiny else SD15_UNET,
                             ATTN2, seed + 1, device)
        scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  skip_prk_steps=True, steps_offset=1)
        return StableDiffusionPipeline(vae=None, text_encoder=text_encoder, tokenizer=clip, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    if family == "sdxl":
        clip_2 = make_clip_tokenizer(pad_token="!")  # SDXL's tokenizer_2 pads with "!"
        spec = dict(TINY_CLIP_2 if tiny else CLIP_BIGG)
        spec["num_hidden_layers"] = text_layers or spec["num_hidden_layers"]
        text_encoder_2 = clip_text_model(clip_2, spec, seed + 2, device, with_projection=True, tiny=tiny)
        unet = meta_denoiser(UNet2DConditionModel, TINY_SDXL_UNET if tiny else SDXL_UNET, ATTN2, seed + 1, device)
        scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                           steps_offset=1, timestep_spacing="leading")
        return StableDiffusionXLPipeline(vae=None, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                         tokenizer=clip, tokenizer_2=clip_2, unet=unet, scheduler=scheduler,
                                         force_zeros_for_empty_prompt=True, add_watermarker=False)
    if family == "flux":
        t5 = make_t5_tokenizer()  # pads to 512, as FLUX.1-dev's max_sequence_length
        text_encoder_2 = t5_model(t5, TINY_T5 if tiny else T5_XXL, text_layers or 2, seed + 2, device)
        transformer = meta_denoiser(FluxTransformer2DModel, TINY_FLUX_TRANSFORMER if tiny else FLUX_TRANSFORMER,
                                    FLUX_LAYERS, seed + 1, device, suffix=False)
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                    max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
        return FluxPipeline(scheduler=scheduler, vae=None, text_encoder=text_encoder, tokenizer=clip,
                            text_encoder_2=text_encoder_2, tokenizer_2=t5, transformer=transformer)
    raise ValueError(f"unknown family {family!r}; use one of {', '.join(FAMILIES)}")


def describe(pipe) -> str:
    """One line on the text towers and target layers of a pipeline from `build_pipeline`."""
    family, layers = family_name(pipe), target_modules(pipe)
    towers = [pipe.text_encoder, getattr(pipe, "text_encoder_2", None)]
    parts = []
    for tower in filter(None, towers):
        c = tower.config
        depth = getattr(c, "num_hidden_layers", None) or c.num_layers
        parts.append(f"{type(tower).__name__} (width {c.hidden_size}, {depth} layers, "
                     f"{sum(p.numel() for p in tower.parameters()) / 1e6:.0f}M parameters)")
    shapes = sorted({f"{m.in_features}→{m.out_features}" + (" +bias" if m.bias is not None else "")
                     for m in layers.values()})
    return (f"{TITLES[family]}: {' + '.join(parts)}; {len(layers)} target layers ({', '.join(shapes)}), "
            f"{sum(m.weight.numel() for m in layers.values()) / 1e6:.0f}M edited weights")


# ---------------------------------------------------------------- target layers and plain encoders (the baseline)
def family_name(pipe) -> str:
    if isinstance(pipe, FluxPipeline):
        return "flux"
    return "sdxl" if isinstance(pipe, StableDiffusionXLPipeline) else "sd15"


def _denoiser(pipe):
    return pipe.transformer if family_name(pipe) == "flux" else pipe.unet


def target_modules(pipe) -> dict[str, torch.nn.Linear]:
    """Every layer an edit changes, by name inside the denoiser, in module order."""
    if family_name(pipe) == "flux":
        return {name: pipe.transformer.get_submodule(name) for name in FLUX_LAYERS}
    return {n: m for n, m in pipe.unet.named_modules() if n.endswith(ATTN2)}


def target_weights(pipe, names=None) -> dict[str, torch.Tensor]:
    """Clones of the weights of the target layers (or of those in `names`)."""
    return {n: m.weight.detach().clone() for n, m in target_modules(pipe).items() if names is None or n in names}


@torch.no_grad()
def _clip(tokenizer, encoder, prompt: str, output: str = "last"):
    inputs = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                       return_tensors="pt")
    out = encoder(inputs.input_ids.to(encoder.device), output_hidden_states=output == "penultimate")
    states = out.hidden_states[-2][0] if output == "penultimate" else out[0][0]
    return states, int(inputs.attention_mask.sum()) - 2


def encode_sd15(pipe, prompt):
    """``text_encoder(ids)[0]`` at full length (77) and ``k``."""
    return _clip(pipe.tokenizer, pipe.text_encoder, prompt)


def encode_sdxl(pipe, prompt):
    """Both towers' penultimate states at full length, concatenated (2048 wide for SDXL), and ``k`` (tokenizer 1)."""
    a, k = _clip(pipe.tokenizer, pipe.text_encoder, prompt, "penultimate")
    b, _ = _clip(pipe.tokenizer_2, pipe.text_encoder_2, prompt, "penultimate")
    return torch.cat([a, b], dim=-1), k


@torch.no_grad()
def encode_t5(pipe, prompt):
    """T5 states at FLUX's 512 tokens (no start token: ``k`` = mask ones − 2, at least 0)."""
    ids = pipe.tokenizer_2(prompt, padding="max_length", max_length=512, truncation=True, return_tensors="pt")
    states = pipe.text_encoder_2(ids.input_ids.to(pipe.text_encoder_2.device))[0][0]
    return states, max(int(ids.attention_mask.sum()) - 2, 0)


@torch.no_grad()
def encode_pooled(pipe, prompt):
    """CLIP's pooled output as a sequence of one token (``k = 0``)."""
    ids = pipe.tokenizer(prompt, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    return pipe.text_encoder(ids.to(pipe.text_encoder.device)).pooler_output, 0


def target_groups(pipe) -> list[tuple[list[str], object]]:
    """``[(layer names, encode)]``: layers solved with the tokens of one encoder; ``encode(pipe, prompt)`` gives the
    full-length states ``(L, d)`` of one prompt and ``k``."""
    family, names = family_name(pipe), list(target_modules(pipe))
    if family == "flux":
        return [(names[:1], encode_t5), (names[1:], encode_pooled)]
    return [(names, encode_sdxl if family == "sdxl" else encode_sd15)]


def token_source(pipe):
    """The tokenizer that sets ``k`` for the first target group and its padded length."""
    tokenizer = pipe.tokenizer_2 if family_name(pipe) == "flux" else pipe.tokenizer
    return tokenizer, tokenizer.model_max_length

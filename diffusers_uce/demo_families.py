# Copyright 2025 The diffusers-uce authors. Licensed under the MIT License.
"""Tiny, offline, seeded Stable Diffusion XL and FLUX pipelines (the `"sdxl"` and `"flux"` demo families).

Built like the Stable Diffusion 1.x / 2.x demo pipelines of [`diffusers_uce.demo`]: tokenizers made in code from the
same built-in word list, randomly initialised (but seeded) models, nothing downloaded. Use them through
[`~diffusers_uce.demo.make_demo_pipeline`].
"""

from __future__ import annotations

import os
import string
from functools import lru_cache

import torch
import transformers
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from .demo import _WORDS, EOS_TOKEN, _text_encoder_config, make_clip_tokenizer


T5_PAD_TOKEN, T5_EOS_TOKEN, T5_UNK_TOKEN = "<pad>", "</s>", "<unk>"
_SPACE = "\u2581"  # SentencePiece's "▁", which marks the start of a word


def _cast(models, torch_dtype: torch.dtype, device: str | torch.device | None) -> None:
    for model in models:
        # As in `make_demo_pipeline`: weights are drawn in float32, then only rounded; `nn.Module.to` because
        # diffusers' `ModelMixin.to(dtype=...)` warns about "modules kept in float32" even when there are none.
        # In eval mode, as `from_pretrained` returns them.
        torch.nn.Module.to(model, device=device, dtype=torch_dtype).eval()


@lru_cache(maxsize=1)
def _t5_vocab() -> tuple[tuple[str, float], ...]:
    words = sorted(set(_WORDS.lower().split()))
    capitalized = [word.capitalize() for word in words if word.capitalize() != word]
    # T5's layout: <pad> = 0, </s> = 1, <unk> = 2, then the pieces. Whole words (T5 is case-sensitive, so also their
    # capitalised forms) score far above the "▁" + single-character pieces any other ASCII word falls back to.
    return (
        (T5_PAD_TOKEN, 0.0),
        (T5_EOS_TOKEN, 0.0),
        (T5_UNK_TOKEN, 0.0),
        *((_SPACE + word, -5.0) for word in words),
        *((_SPACE + word, -6.0) for word in capitalized),
        (_SPACE, -8.0),
        *((char, -10.0) for char in string.printable[:94]),  # digits, letters and punctuation
    )


def make_t5_tokenizer(
    save_directory: str | os.PathLike | None = None,
    *,
    model_max_length: int = 512,
) -> transformers.T5TokenizerFast:
    r"""
    Builds a small SentencePiece-style (Unigram) [`~transformers.T5TokenizerFast`] offline.

    The vocabulary holds every word of the built-in word list, lowercase and capitalised, as a single `"▁word"` piece;
    other ASCII text falls back to `"▁"` and single characters, anything else to `"<unk>"`. Like T5's, it is
    case-sensitive, appends `"</s>"` and pads with `"<pad>"` (`"<pad>"`, `"</s>"`, `"<unk>"` are ids 0, 1, 2), and
    `""` tokenises to `["</s>"]` alone.

    Args:
        save_directory (`str` or `os.PathLike`, *optional*):
            Where to also save it with `save_pretrained` (created if needed).
        model_max_length (`int`, *optional*, defaults to 512):
            The maximum sequence length, `"</s>"` included (FLUX pads the prompt to 512 tokens by default).

    Returns:
        [`~transformers.T5TokenizerFast`]: The tokenizer.
    """
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import Unigram

    # The same pipeline as transformers 5's `T5Tokenizer` builds from a vocabulary: transformers 5 rebuilds it that
    # way (from the saved vocabulary and post-processor only) when loading, so anything else would not survive a
    # `save_pretrained` / `from_pretrained` round trip (a `Lowercase` normalizer, for one, is dropped).
    backend = Tokenizer(Unigram(list(_t5_vocab()), unk_id=2, byte_fallback=False))
    metaspace = dict(replacement=_SPACE, prepend_scheme="always", split=True)
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(**metaspace)]
    )
    backend.decoder = decoders.Metaspace(**metaspace)
    backend.post_processor = processors.TemplateProcessing(
        single=["$A", T5_EOS_TOKEN], pair=["$A", T5_EOS_TOKEN, "$B", T5_EOS_TOKEN], special_tokens=[(T5_EOS_TOKEN, 1)]
    )
    tokenizer = transformers.T5TokenizerFast(
        tokenizer_object=backend,
        eos_token=T5_EOS_TOKEN,
        unk_token=T5_UNK_TOKEN,
        pad_token=T5_PAD_TOKEN,
        extra_ids=0,
        model_max_length=model_max_length,
    )
    if save_directory is not None:
        tokenizer.save_pretrained(save_directory)
    return tokenizer


def _clip_with_projection(tokenizer, hidden_size: int, hidden_act: str, projection_dim: int):
    config = _text_encoder_config(tokenizer, hidden_size, hidden_act)
    config.projection_dim = projection_dim
    return CLIPTextModelWithProjection(config)


def make_demo_sdxl_pipeline(
    *, seed: int = 0, torch_dtype: torch.dtype = torch.float32, device: str | torch.device | None = None
) -> StableDiffusionXLPipeline:
    r"""
    Builds a tiny, randomly initialised [`~diffusers.StableDiffusionXLPipeline`] without downloading anything.

    Components: a 2-layer [`~transformers.CLIPTextModel`] (width 32, `"<|endoftext|>"` padding) and a 2-layer
    [`~transformers.CLIPTextModelWithProjection`] (width 48, projection 16, `"!"` padding), a 2-level
    [`~diffusers.UNet2DConditionModel`] with SDXL's `"text_time"` conditioning, cross-attention width 32 + 48 = 80 and
    8 `attn2` modules (2 transformer layers in the second level and the middle), a 2-level
    [`~diffusers.AutoencoderKL`] (latents are half the image size) and an [`~diffusers.EulerDiscreteScheduler`]
    configured as SDXL's. `force_zeros_for_empty_prompt=True`, no watermarker. The default image is 32x32.

    Args:
        seed (`int`, *optional*, defaults to 0):
            Seed for the weights; the same seed gives identical weights. The global RNG state is left untouched.
        torch_dtype (`torch.dtype`, *optional*, defaults to `torch.float32`):
            The dtype to cast the pipeline to.
        device (`str` or `torch.device`, *optional*):
            The device to move the pipeline to; it stays on the CPU if not given.

    Returns:
        [`~diffusers.StableDiffusionXLPipeline`]: The pipeline.
    """
    tokenizer, tokenizer_2 = make_clip_tokenizer(pad_token=EOS_TOKEN), make_clip_tokenizer(pad_token="!")
    hidden_size, hidden_size_2, projection_dim, time_dim = 32, 48, 16, 8
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(_text_encoder_config(tokenizer, hidden_size, "quick_gelu"))
        text_encoder_2 = _clip_with_projection(tokenizer_2, hidden_size_2, "gelu", projection_dim)
        unet = UNet2DConditionModel(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2),
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            cross_attention_dim=hidden_size + hidden_size_2,
            addition_embed_type="text_time",
            addition_time_embed_dim=time_dim,
            projection_class_embeddings_input_dim=6 * time_dim + projection_dim,
            norm_num_groups=8,
        )
        vae = AutoencoderKL(
            sample_size=32,
            in_channels=3,
            out_channels=3,
            block_out_channels=(16, 32),
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            latent_channels=4,
            norm_num_groups=8,
            scaling_factor=0.13025,
        )
    _cast((text_encoder, text_encoder_2, unet, vae), torch_dtype, device)
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type="epsilon",
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_demo_flux_pipeline(
    *, seed: int = 0, torch_dtype: torch.dtype = torch.float32, device: str | torch.device | None = None
) -> FluxPipeline:
    r"""
    Builds a tiny, randomly initialised [`~diffusers.FluxPipeline`] without downloading anything.

    Components: a 2-layer [`~transformers.CLIPTextModel`] (width 48; its pooled output conditions the transformer), a
    2-layer [`~transformers.T5EncoderModel`] (width 64, gated-GELU like T5 v1.1) with the [`make_t5_tokenizer`]
    tokenizer (512 tokens), a [`~diffusers.FluxTransformer2DModel`] with 1 double-stream and 1 single-stream block
    (2 heads of 16, so width 32: `context_embedder` maps T5's 64 to 32, `time_text_embed.text_embedder.linear_1`
    CLIP's 48 to 32; guidance-distilled like FLUX.1-dev), a 2-level [`~diffusers.AutoencoderKL`] with FLUX's 16
    latent channels (latents are half the image size, then packed in 2x2 patches: image sizes should be multiples of
    4) and a [`~diffusers.FlowMatchEulerDiscreteScheduler`] with FLUX.1-dev's resolution-dependent shift.

    The default image is 32x32 for the pipeline returned (`default_sample_size` is set on it); `FluxPipeline`
    hard-codes it, so a reloaded copy defaults to 256x256: pass `height` and `width` to it.

    Args:
        seed (`int`, *optional*, defaults to 0):
            Seed for the weights; the same seed gives identical weights. The global RNG state is left untouched.
        torch_dtype (`torch.dtype`, *optional*, defaults to `torch.float32`):
            The dtype to cast the pipeline to.
        device (`str` or `torch.device`, *optional*):
            The device to move the pipeline to; it stays on the CPU if not given.

    Returns:
        [`~diffusers.FluxPipeline`]: The pipeline.
    """
    tokenizer, tokenizer_2 = make_clip_tokenizer(pad_token=EOS_TOKEN), make_t5_tokenizer()
    hidden_size, d_model = 48, 64
    t5_config = T5Config(
        vocab_size=len(tokenizer_2),
        d_model=d_model,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        tie_word_embeddings=False,
        pad_token_id=tokenizer_2.pad_token_id,
        eos_token_id=tokenizer_2.eos_token_id,
        decoder_start_token_id=tokenizer_2.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(_text_encoder_config(tokenizer, hidden_size, "quick_gelu"))
        text_encoder_2 = T5EncoderModel(t5_config)
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=64,  # 16 latent channels packed in 2x2 patches
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=d_model,
            pooled_projection_dim=hidden_size,
            guidance_embeds=True,
            axes_dims_rope=[4, 4, 8],  # sums to attention_head_dim
        )
        vae = AutoencoderKL(
            sample_size=32,
            in_channels=3,
            out_channels=3,
            block_out_channels=(16, 32),
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            latent_channels=16,
            norm_num_groups=8,
            use_quant_conv=False,
            use_post_quant_conv=False,
            scaling_factor=0.3611,
            shift_factor=0.1159,
        )
    _cast((text_encoder, text_encoder_2, transformer, vae), torch_dtype, device)
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    pipe.default_sample_size = 16  # x vae_scale_factor 2 = 32x32 images by default
    pipe.set_progress_bar_config(disable=True)
    return pipe

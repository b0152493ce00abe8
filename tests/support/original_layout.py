"""Tiny pipelines with the topology of the real SD 1.x, SD 2.x and SDXL checkpoints (block and layer counts, block
types, SDXL's transformer depths, SD 2.x's 1024-wide text states), so that their single-file keys are the real
checkpoints' keys and diffusers' key-name detection (`infer_diffusers_model_type`) recognises them; only the widths
are small. The demo pipelines have fewer blocks and layers."""

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from diffusers_uce.demo.tokenizers import EOS_TOKEN, clip_text_config, make_clip_tokenizer

# the real checkpoints' UNet block types: attention in the first three levels (SD) / the last two (SDXL)
_SD_DOWN = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
_SD_UP = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
_SDXL_DOWN = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
_SDXL_UP = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")


def _text_encoder(tokenizer, hidden_size, hidden_act, layers, projection_dim=None, heads=4):
    config = clip_text_config(tokenizer, hidden_size, hidden_act)
    config.num_hidden_layers, config.num_attention_heads = layers, heads
    if projection_dim is None:
        return CLIPTextModel(config)
    config.projection_dim = projection_dim
    return CLIPTextModelWithProjection(config)


def _vae(scaling_factor):
    # 4 levels of 2 resnets (SD's VAE: 128, 256, 512, 512 channels), each change of width a shortcut as in the real one
    return AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 16, 32, 32), layers_per_block=2,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         latent_channels=4, norm_num_groups=8, sample_size=64, scaling_factor=scaling_factor)


def make_original_layout_pipeline(family: str, seed: int = 0):
    """A tiny `"sd1"`, `"sd2"` (OpenCLIP-like text encoder, 1024 wide, v-prediction) or `"sdxl"` pipeline with the
    real model's topology."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if family == "sdxl":
            return _sdxl()
        return _sd(family == "sd2")


def _sd(sd2: bool) -> StableDiffusionPipeline:
    tokenizer = make_clip_tokenizer(pad_token="!" if sd2 else EOS_TOKEN)
    width = 1024 if sd2 else 32  # SD 2.x: diffusers recognises it by its 1024-wide cross-attention keys
    text_encoder = _text_encoder(tokenizer, width, "gelu" if sd2 else "quick_gelu", layers=2, heads=16 if sd2 else 4)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16, 16, 16), layers_per_block=2,
        down_block_types=_SD_DOWN, up_block_types=_SD_UP, cross_attention_dim=width,
        attention_head_dim=(1, 2, 2, 2) if sd2 else 2, use_linear_projection=sd2, norm_num_groups=8,
    )
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1,
                              prediction_type="v_prediction" if sd2 else "epsilon")
    pipe = StableDiffusionPipeline(vae=_vae(0.18215), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sdxl() -> StableDiffusionXLPipeline:
    tokenizer, tokenizer_2 = make_clip_tokenizer(pad_token=EOS_TOKEN), make_clip_tokenizer(pad_token="!")
    text_encoder = _text_encoder(tokenizer, 32, "quick_gelu", layers=2)
    # OpenCLIP-bigG: 10 layers are enough for diffusers' SDXL key (resblocks.9) and its text projection
    text_encoder_2 = _text_encoder(tokenizer_2, 48, "gelu", layers=10, projection_dim=16)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16, 32), layers_per_block=2,
        down_block_types=_SDXL_DOWN, up_block_types=_SDXL_UP, transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(1, 2, 4), use_linear_projection=True, cross_attention_dim=32 + 48,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 16,
        norm_num_groups=8,
    )
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(vae=_vae(0.13025), text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler,
                                     force_zeros_for_empty_prompt=True, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe

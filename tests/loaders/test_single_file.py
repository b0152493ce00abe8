"""Single-file checkpoint export (`save_single_file`): the whole fused pipeline as one file in the original layout.

Plain diffusers reads it back (`from_single_file(path, config=folder)`, no plugin) to the edited pipeline's weights,
bit for bit; its keys are the real checkpoints' (a sample checked by name on pipelines with the real topology, and
diffusers' own key-name detection finds the family); bad requests are refused before anything is written.
"""

import json
import os

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.loaders.single_file_utils import CHECKPOINT_KEY_NAMES, infer_diffusers_model_type
from safetensors import safe_open

import diffusers_uce
from diffusers_uce.demo import make_demo_pipeline
from tests.support.original_layout import make_original_layout_pipeline

ERASE = ["van gogh", "picasso"]
CLASSES = {"sd1": StableDiffusionPipeline, "sd2": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline}
COMPONENTS = {"sd1": ("unet", "vae", "text_encoder"), "sd2": ("unet", "vae", "text_encoder"),
              "sdxl": ("unet", "vae", "text_encoder", "text_encoder_2")}
ARCHITECTURES = {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2-768-v",
                 "sdxl": "stable-diffusion-xl-v1-base"}

# Keys of the real checkpoints (v1-5-pruned, v2-1_768, sd_xl_base_1.0), with a shape check where the layout
# reshapes: the pipelines of `make_original_layout_pipeline` have their topology, so every one must be in the file.
_UNET, _VAE = "model.diffusion_model.", "first_stage_model."
VAE_KEYS = [_VAE + k for k in (
    "encoder.conv_in.weight", "encoder.down.0.block.0.conv1.weight", "encoder.down.1.block.0.nin_shortcut.weight",
    "encoder.down.2.downsample.conv.weight", "encoder.down.3.block.1.norm2.weight", "encoder.mid.block_1.conv1.weight",
    "encoder.mid.attn_1.q.weight", "encoder.norm_out.weight", "quant_conv.weight", "post_quant_conv.weight",
    "decoder.mid.attn_1.proj_out.weight", "decoder.mid.block_2.conv2.bias", "decoder.up.0.block.0.nin_shortcut.weight",
    "decoder.up.1.block.2.conv2.weight", "decoder.up.3.upsample.conv.weight", "decoder.norm_out.bias")]
SD_UNET_KEYS = [_UNET + k for k in (
    "time_embed.0.weight", "input_blocks.0.0.weight", "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
    "input_blocks.1.0.in_layers.2.weight", "input_blocks.3.0.op.weight", "input_blocks.4.0.skip_connection.weight",
    "input_blocks.11.0.out_layers.3.weight", "middle_block.1.proj_in.weight", "middle_block.2.emb_layers.1.weight",
    "output_blocks.2.1.conv.weight", "output_blocks.5.2.conv.weight", "output_blocks.8.2.conv.weight",
    "output_blocks.11.1.transformer_blocks.0.attn2.to_v.weight", "out.0.weight", "out.2.weight")]
SDXL_UNET_KEYS = [_UNET + k for k in (
    "label_emb.0.0.weight", "label_emb.0.2.bias", "input_blocks.3.0.op.weight", "input_blocks.6.0.op.weight",
    "input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight",
    "input_blocks.7.1.transformer_blocks.9.attn2.to_v.weight", "middle_block.1.transformer_blocks.9.ff.net.2.weight",
    "output_blocks.0.1.transformer_blocks.9.attn1.to_q.weight", "output_blocks.2.2.conv.weight",
    "output_blocks.5.2.conv.weight", "output_blocks.8.0.skip_connection.weight")]
OPEN_CLIP_KEYS = ("transformer.resblocks.0.attn.in_proj_weight", "transformer.resblocks.1.attn.in_proj_bias",
                  "transformer.resblocks.0.attn.out_proj.weight", "transformer.resblocks.0.ln_1.weight",
                  "transformer.resblocks.1.ln_2.bias", "transformer.resblocks.0.mlp.c_fc.weight",
                  "transformer.resblocks.1.mlp.c_proj.bias", "token_embedding.weight", "positional_embedding",
                  "ln_final.weight")
KNOWN_KEYS = {
    "sd1": SD_UNET_KEYS + VAE_KEYS + [f"cond_stage_model.transformer.text_model.{k}" for k in (
        "encoder.layers.0.self_attn.q_proj.weight", "encoder.layers.1.mlp.fc2.bias",
        "embeddings.token_embedding.weight", "embeddings.position_embedding.weight", "final_layer_norm.weight")],
    "sd2": SD_UNET_KEYS + VAE_KEYS + [f"cond_stage_model.model.{k}" for k in OPEN_CLIP_KEYS],
    "sdxl": SDXL_UNET_KEYS + VAE_KEYS + [f"conditioner.embedders.1.model.{k}" for k in OPEN_CLIP_KEYS] + [
        "conditioner.embedders.1.model.transformer.resblocks.9.attn.in_proj_weight",
        "conditioner.embedders.1.model.text_projection",
        "conditioner.embedders.0.transformer.text_model.encoder.layers.1.self_attn.out_proj.weight"],
}
# What diffusers infers from the keys alone, and the keys it looks for to tell each text encoder.
DETECTED = {"sd1": ("v1", ["v1", "clip"]), "sd2": ("v2", ["v2", "open_clip"]),
            "sdxl": ("xl_base", ["xl_base", "clip_sdxl", "open_clip_sdxl"])}


def read(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def build(family, topology="demo"):
    maker = make_demo_pipeline if topology == "demo" else make_original_layout_pipeline
    return diffusers_uce.attach(maker(family))


def edited(family, topology="demo"):
    pipe = build(family, topology)
    pipe.apply_concept_edits(ERASE, guide="art", preserve=["monet"], held_out=[])
    pipe.fuse_concept_edits()
    return pipe


def assert_same_weights(loaded, pipe, family):
    for component in COMPONENTS[family]:
        ours, theirs = getattr(pipe, component).state_dict(), getattr(loaded, component).state_dict()
        assert set(ours) == set(theirs), component
        for key, tensor in ours.items():
            assert theirs[key].dtype == tensor.dtype and torch.equal(theirs[key], tensor), f"{component}.{key}"


@pytest.mark.parametrize("topology", ["demo", "original"])
@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_round_trip_through_from_single_file(family, topology, tmp_path):
    pipe = edited(family, topology)
    pipe.save_pretrained(tmp_path / "folder")
    path = pipe.save_single_file(tmp_path / "model.safetensors")
    assert path == str(tmp_path / "model.safetensors")
    assert sorted(os.listdir(tmp_path)) == ["folder", "model.safetensors"]

    loaded = CLASSES[family].from_single_file(path, config=str(tmp_path / "folder"), local_files_only=True)
    assert type(loaded) is CLASSES[family]  # plain diffusers, no plugin
    assert_same_weights(loaded, pipe, family)
    base = build(family, topology)  # the file holds the edit, not the base model
    to_v = next(n for n, _ in base.unet.named_modules() if n.endswith("attn2.to_v"))
    assert not torch.equal(loaded.unet.get_submodule(to_v).weight, base.unet.get_submodule(to_v).weight)

    _, metadata = read(path)
    assert metadata["format"] == "pt" and metadata["modelspec.architecture"] == ARCHITECTURES[family]
    assert metadata["modelspec.title"] == "UCE: erase van gogh, picasso"
    uce = json.loads(metadata["diffusers_uce"])
    assert [e["erase"] for e in uce["edits"]] == [ERASE] and uce["scale"] == 1.0


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_keys_are_the_original_checkpoints(family, tmp_path):
    pipe = build(family, "original")  # no edit: written as it is
    tensors, metadata = read(pipe.save_single_file(tmp_path / "base.safetensors"))

    missing = [k for k in KNOWN_KEYS[family] if k not in tensors]
    assert not missing, missing
    model_type, names = DETECTED[family]
    assert infer_diffusers_model_type(tensors) == model_type
    assert all(CHECKPOINT_KEY_NAMES[name] in tensors for name in names)
    # nothing in diffusers' names, and nothing the original layout does not have
    diffusers_names = ("down_blocks", "up_blocks", "mid_block", "resnets", "attentions.", "upsamplers", "conv_norm")
    assert not [k for k in tensors if any(n in k for n in diffusers_names)]
    assert f"{_VAE}encoder.down.3.downsample.conv.weight" not in tensors
    assert f"{_VAE}decoder.up.0.upsample.conv.weight" not in tensors
    # the reshaped tensors: 1x1 convolutions, stacked query/key/value, transposed projection
    assert tensors[f"{_VAE}encoder.mid.attn_1.q.weight"].shape == (32, 32, 1, 1)
    if family != "sd1":
        prefix, encoder = ("cond_stage_model.model.", pipe.text_encoder) if family == "sd2" else (
            "conditioner.embedders.1.model.", pipe.text_encoder_2)
        name = next(n for n, _ in encoder.named_modules() if n.endswith("layers.1.self_attn"))
        attention = encoder.get_submodule(name)
        stacked = torch.cat([attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight])
        assert torch.equal(tensors[f"{prefix}transformer.resblocks.1.attn.in_proj_weight"], stacked)
    if family == "sdxl":
        assert torch.equal(tensors["conditioner.embedders.1.model.text_projection"],
                           pipe.text_encoder_2.text_projection.weight.T)
    assert len(tensors) == len(set(tensors))
    assert metadata["modelspec.title"] == "base" and json.loads(metadata["diffusers_uce"])["edits"] == []
    assert metadata["modelspec.architecture"] == ARCHITECTURES[family]
    assert metadata["modelspec.prediction_type"] == ("v" if family == "sd2" else "epsilon")


def test_dtypes(tmp_path):
    half = diffusers_uce.attach(make_demo_pipeline("sd1", torch_dtype=torch.float16))
    tensors, _ = read(half.save_single_file(tmp_path / "half.safetensors"))
    assert {t.dtype for t in tensors.values()} == {torch.float16}  # the pipeline's own dtype

    pipe = edited("sd1")
    tensors, _ = read(pipe.save_single_file(tmp_path / "cast.safetensors", dtype=torch.float16))
    assert {t.dtype for t in tensors.values()} == {torch.float16}
    key = f"{_UNET}input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    assert torch.equal(tensors[key], pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_k.weight
                       .half())
    assert pipe.unet.dtype == torch.float32  # the pipeline is not cast
    for bad in (torch.int8, "float16", torch.bool):
        with pytest.raises(ValueError, match="floating-point torch.dtype"):
            pipe.save_single_file(tmp_path / "bad.safetensors", dtype=bad)
    assert not (tmp_path / "bad.safetensors").exists()


def test_unfused_edits_are_refused(tmp_path):
    pipe = build("sd1")
    pipe.apply_concept_edits(ERASE, guide="art", held_out=[])
    path = tmp_path / "out" / "model.safetensors"
    for scale in (1.0, 0.5):  # processor mode, at full and partial strength
        pipe.set_concept_edit_scale(scale)
        with pytest.raises(ValueError, match=r"not fused.*pipe\.fuse_concept_edits\(\) first"):
            pipe.save_single_file(path)
        assert not (tmp_path / "out").exists() and not pipe.concept_edits_fused
    pipe.save_single_file(path, fuse_concept_edits=True)  # as save_pretrained: fuse on the way
    assert pipe.concept_edits_fused and path.is_file()
    assert json.loads(read(path)[1]["diffusers_uce"])["scale"] == 0.5


def test_weights_without_a_place_are_refused_before_anything_changes(tmp_path):
    pipe = build("sd1")
    pipe.apply_concept_edits(ERASE, guide="art", held_out=[])
    pipe.unet.extra = torch.nn.Linear(2, 2)  # a module the original UNet does not have
    with pytest.raises(ValueError, match=r"no place in the original single-file layout: extra\.weight, extra\.bias"):
        pipe.save_single_file(tmp_path / "model.safetensors", fuse_concept_edits=True)
    assert not pipe.concept_edits_fused and os.listdir(tmp_path) == []


def test_flux_is_refused(tmp_path):
    pipe = build("flux")
    with pytest.raises(ValueError, match="supports Stable Diffusion 1.x/2.x and SDXL, not flux.*save_pretrained.*or "
                                         "the LoRA export"):
        pipe.save_single_file(tmp_path / "flux.safetensors")
    pipe.apply_concept_edits(ERASE, guide="art", held_out=[])
    pipe.fuse_concept_edits()
    with pytest.raises(ValueError, match="single-file export supports"):
        pipe.save_single_file(tmp_path / "flux.safetensors")
    assert os.listdir(tmp_path) == []


def test_paths(tmp_path):
    pipe = edited("sd1")
    (tmp_path / "folder.safetensors").mkdir()
    (tmp_path / "file").write_text("")
    for bad, message in [("model.ckpt", "ending in '.safetensors'"), ("model.bin", "ending in '.safetensors'"),
                         ("model.safetensors.tmp", "ending in '.safetensors'"), (".safetensors", "ending in"),
                         ("folder.safetensors", "is a folder"), ("file/model.safetensors", "is a file")]:
        with pytest.raises(ValueError, match=message):
            pipe.save_single_file(tmp_path / bad)
    assert sorted(os.listdir(tmp_path)) == ["file", "folder.safetensors"]
    assert os.listdir(tmp_path / "folder.safetensors") == []


def test_existing_file_is_never_replaced_silently(tmp_path):
    pipe = edited("sd1")
    path = tmp_path / "model.safetensors"
    pipe.save_single_file(path)
    before = path.read_bytes()
    pipe.set_concept_edit_scale(0.5)  # a different file
    with pytest.raises(FileExistsError, match="overwrite=True"):
        pipe.save_single_file(path)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["model.safetensors"]
    pipe.save_single_file(str(path), overwrite=True)
    assert path.read_bytes() != before and json.loads(read(path)[1]["diffusers_uce"])["scale"] == 0.5
    assert os.listdir(tmp_path) == ["model.safetensors"]  # no temporary file left

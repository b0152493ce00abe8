"""LoRA export in the kohya/sd-scripts layout (`format="kohya"`): what AUTOMATIC1111 and ComfyUI load.

Plain diffusers (no plugin) reads the file back through its kohya conversion (`load_lora_weights`, then
`fuse_lora`) and gets the fused edit's weights; the key names follow sd-scripts' layout (diffusers UNet names for
SD 1.x, SGM block names for SDXL); the header holds sd-scripts' and the SAI model spec's keys.
"""

import json
import re
from types import SimpleNamespace

import pytest
import safetensors
import torch

from diffusers_uce.demo import make_demo_pipeline
from diffusers_uce.loaders.lora_kohya import sgm_module_name
from tests.support.helpers import rel, run_cli, target_layers, weights
from tests.support.reference import denoiser

pytest.importorskip("peft")

ERASE = ["van gogh", "picasso"]
KOHYA = "uce_lora.safetensors"
KEY = re.compile(r"^lora_unet_[a-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)$")
METADATA = ["ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_base_model_version", "ss_output_name",
            "modelspec.sai_model_spec", "modelspec.architecture", "modelspec.implementation", "modelspec.title",
            "diffusers_uce"]


def read(path):
    with safetensors.safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def kohya_name(name, sgm):
    """What sd-scripts calls a diffusers UNet module (SDXL: through the SGM block names)."""
    config = SimpleNamespace(layers_per_block=1)  # the tiny demo UNets'
    return "lora_unet_" + (sgm_module_name(name, config) if sgm else name).replace(".", "_")


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize("technique", ["replace", "tensor"])
def test_kohya_file_loads_in_plain_pipeline(pipe, family, technique, tmp_path):
    pipe.apply_concept_edits(ERASE, guide="art", preserve=["rembrandt"], technique=technique, held_out=[])
    pipe.set_concept_edit_scale(0.8)
    assert pipe.save_concept_edits_as_lora(tmp_path / "diffusers") < 1e-8
    assert pipe.save_concept_edits_as_lora(tmp_path, format="kohya") < 1e-8
    tensors, metadata = read(tmp_path / KOHYA)

    # the layout: every key, SDXL's SGM block names, one alpha (0-d float = rank) per module
    assert all(KEY.match(k) for k in tensors), [k for k in tensors if not KEY.match(k)]
    sgm = family == "sdxl"
    blocks = ("input_blocks", "middle_block", "output_blocks") if sgm else ("down_blocks", "mid_block", "up_blocks")
    other = ("down_blocks", "mid_block", "up_blocks") if sgm else ("input_blocks", "middle_block", "output_blocks")
    assert all(any(b in k for b in blocks) and not any(b in k for b in other) for k in tensors)
    names = [n for n, _ in target_layers(pipe)]
    assert set(tensors) == {f"{kohya_name(n, sgm)}.{s}" for n in names
                            for s in ("lora_down.weight", "lora_up.weight", "alpha")}
    diffusers_tensors, _ = read(tmp_path / "diffusers" / "pytorch_lora_weights.safetensors")
    for n in names:  # the same factors as the diffusers export, bit for bit
        key = kohya_name(n, sgm)
        assert torch.equal(tensors[f"{key}.lora_down.weight"], diffusers_tensors[f"unet.{n}.lora_A.weight"])
        assert torch.equal(tensors[f"{key}.lora_up.weight"], diffusers_tensors[f"unet.{n}.lora_B.weight"])
        alpha = tensors[f"{key}.alpha"]
        assert alpha.dim() == 0 and alpha.dtype == torch.float32
        assert float(alpha) == tensors[f"{key}.lora_down.weight"].shape[0]  # scale alpha / rank = 1

    # the header
    assert set(METADATA) <= set(metadata)
    assert metadata["ss_network_module"] == "networks.lora" and metadata["modelspec.sai_model_spec"] == "1.0.0"
    assert metadata["ss_base_model_version"] == {"sd1": "sd_v1", "sdxl": "sdxl_base_v1-0"}[family]
    assert metadata["modelspec.architecture"] == {"sd1": "stable-diffusion-v1/lora",
                                                  "sdxl": "stable-diffusion-xl-v1-base/lora"}[family]
    assert metadata["modelspec.implementation"] == "diffusers"
    assert metadata["modelspec.title"] == "UCE: erase van gogh, picasso"
    assert metadata["ss_output_name"] == "uce_lora"
    ranks = {t.shape[0] for k, t in tensors.items() if k.endswith("lora_down.weight")}
    assert int(metadata["ss_network_dim"]) in ranks and float(metadata["ss_network_alpha"]) in ranks
    uce = json.loads(metadata["diffusers_uce"])
    assert uce["scale"] == 0.8 and [e["erase"] for e in uce["edits"]] == [ERASE]
    assert "uce_lora.safetensors" in (tmp_path / "README.md").read_text()  # the card names the file

    # plain diffusers reads it back (its kohya / SGM conversion) and fuses the same weights
    plain = make_demo_pipeline(family)  # no plugin
    original = weights(plain)
    plain.load_lora_weights(tmp_path, weight_name=KOHYA)
    plain.fuse_lora()
    pipe.fuse_concept_edits()
    fused = weights(pipe)
    for n in names:
        module = denoiser(plain).get_submodule(n)
        loaded = getattr(module, "get_base_layer", lambda m=module: m)().weight.detach()
        assert rel(loaded, fused[n]) < 1e-5, n
        assert rel(loaded - original[n], fused[n] - original[n]) < 1e-4, n  # the change itself, not just W


def test_sgm_names_of_sdxl_base():
    """SDXL base (layers_per_block 2; attention in down blocks 1-2, the mid block, up blocks 0-1): the SGM names
    sd-scripts writes, and diffusers' own SGM → diffusers mapping takes them back."""
    from diffusers.loaders.lora_conversion_utils import (
        _convert_unet_lora_key,
        _maybe_map_sgm_blocks_to_diffusers,
    )

    config = SimpleNamespace(layers_per_block=2)
    expected = {
        "down_blocks.1.attentions.0": "input_blocks.4.1", "down_blocks.1.attentions.1": "input_blocks.5.1",
        "down_blocks.2.attentions.0": "input_blocks.7.1", "down_blocks.2.attentions.1": "input_blocks.8.1",
        "mid_block.attentions.0": "middle_block.1",
        **{f"up_blocks.{b}.attentions.{j}": f"output_blocks.{3 * b + j}.1" for b in (0, 1) for j in range(3)},
    }
    suffix = ".transformer_blocks.9.attn2.to_k"
    for name, sgm in expected.items():
        assert sgm_module_name(name + suffix, config) == sgm + suffix
    kohya = {"lora_unet_" + (sgm + suffix).replace(".", "_") + ".lora_down.weight": torch.zeros(1)
             for sgm in expected.values()}
    back = {_convert_unet_lora_key(k) for k in _maybe_map_sgm_blocks_to_diffusers(kohya, config)}
    assert back == {_convert_unet_lora_key("lora_unet_" + (n + suffix).replace(".", "_") + ".lora_down.weight")
                    for n in expected}
    assert len(back) == len(expected) and all(k.startswith(("down_blocks", "mid_block", "up_blocks")) for k in back)
    with pytest.raises(ValueError, match="no SGM name"):
        sgm_module_name("conv_in", config)
    with pytest.raises(ValueError, match="layers_per_block"):
        sgm_module_name(next(iter(expected)) + suffix, SimpleNamespace(layers_per_block=(2, 2, 2)))


@pytest.mark.parametrize("family", ["flux"])
def test_flux_refuses_kohya(pipe, tmp_path):
    pipe.apply_concept_edits(ERASE, guide="art", held_out=[])
    with pytest.raises(ValueError, match="format='diffusers'"):
        pipe.save_concept_edits_as_lora(tmp_path / "out", format="kohya")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("family", ["sd1"])
def test_bad_format_refuses_before_writing(pipe, tmp_path):
    for bad in ("Kohya", "peft", None, 1):
        with pytest.raises(ValueError, match="format must be one of 'diffusers', 'kohya'"):
            pipe.save_concept_edits_as_lora(tmp_path / "out", format=bad)
    pipe.apply_concept_edits(ERASE, guide="art", held_out=[])
    with pytest.raises(ValueError, match="format must be one of"):
        pipe.save_concept_edits_as_lora(tmp_path / "out", format="safetensors")
    assert not (tmp_path / "out").exists()
    pipe.save_concept_edits_as_lora(tmp_path / "out", format="kohya", weight_name="no-van-gogh.safetensors",
                                    write_model_card=False)
    _, metadata = read(tmp_path / "out" / "no-van-gogh.safetensors")
    assert metadata["ss_output_name"] == "no-van-gogh" and not (tmp_path / "out" / "README.md").exists()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        pipe.save_concept_edits_as_lora(tmp_path / "out", format="kohya", weight_name="no-van-gogh.safetensors")


def test_cli_lora_format(tmp_path):
    code, _, err = run_cli("edit", "--erase", "van gogh", "--guide", "art", "--lora", tmp_path / "lora",
                           "--lora-format", "kohya", "--held-out", "")
    assert code == 0, err
    tensors, metadata = read(tmp_path / "lora" / KOHYA)
    assert tensors and all(KEY.match(k) for k in tensors) and metadata["ss_base_model_version"] == "sd_v1"
    code, _, err = run_cli("edit", "--erase", "a", "--lora-format", "kohya")
    assert code == 2 and "--lora-format only applies with --lora" in err
    code, _, err = run_cli("edit", "--model", "demo-flux", "--erase", "a", "--lora", tmp_path / "flux",
                           "--lora-format", "kohya", "--held-out", "")
    assert code == 2 and "format='diffusers'" in err and not (tmp_path / "flux" / KOHYA).exists()

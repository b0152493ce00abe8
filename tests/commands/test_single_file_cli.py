"""`diffusers-uce edit --output-single-file PATH`: the fused edited pipeline as one original-layout checkpoint that
plain diffusers loads back; the path is checked before the model is loaded, FLUX refused before the solve."""

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

import diffusers_uce
from diffusers_uce.demo import make_demo_pipeline
from tests.support.helpers import run_cli

EDIT = ("edit", "--erase", "van gogh", "--guide", "art", "--held-out", "")


def same_weights(a, b, components):
    return all(torch.equal(t, getattr(b, c).state_dict()[k]) for c in components
               for k, t in getattr(a, c).state_dict().items())


def test_output_single_file_loads_back_as_the_saved_pipeline(tmp_path):
    path = tmp_path / "sd14-no-van-gogh.safetensors"
    code, out, err = run_cli(*EDIT, "--output", tmp_path / "folder", "--output-single-file", path)
    assert code == 0, err
    assert "efficacy" in out and f"as one checkpoint to {path}" in err
    folder = StableDiffusionPipeline.from_pretrained(tmp_path / "folder")
    single = StableDiffusionPipeline.from_single_file(str(path), config=str(tmp_path / "folder"),
                                                      local_files_only=True)
    assert same_weights(single, folder, ("unet", "vae", "text_encoder"))


def test_output_single_file_alone_is_the_fused_edit(tmp_path):
    path = tmp_path / "xl.safetensors"
    code, _, err = run_cli(*EDIT, "--model", "demo-sdxl", "--output-single-file", path)
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["xl.safetensors"]
    expected = diffusers_uce.attach(make_demo_pipeline("sdxl"))
    expected.apply_concept_edits("van gogh", guide="art", held_out=[])
    expected.fuse_concept_edits()
    expected.save_pretrained(tmp_path / "config")
    single = StableDiffusionXLPipeline.from_single_file(str(path), config=str(tmp_path / "config"),
                                                        local_files_only=True)
    assert same_weights(single, expected, ("unet", "vae", "text_encoder", "text_encoder_2"))


@pytest.mark.parametrize("overwrite", [False, True])
def test_existing_file_needs_overwrite(tmp_path, overwrite):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"mine")
    code, _, err = run_cli(*EDIT, "--output-single-file", path, *(["--overwrite"] if overwrite else []))
    if not overwrite:
        assert code == 2 and "--overwrite" in err and "Loading" not in err  # refused before loading the model
        assert path.read_bytes() == b"mine"
    else:
        assert code == 0, err
        assert path.read_bytes() != b"mine"
        StableDiffusionPipeline.from_single_file(str(path), config=_demo_config(tmp_path), local_files_only=True)


def _demo_config(tmp_path):
    make_demo_pipeline("sd1").save_pretrained(tmp_path / "config")
    return str(tmp_path / "config")


def test_bad_requests_are_refused_early(tmp_path):
    code, _, err = run_cli(*EDIT, "--output-single-file", tmp_path / "model.ckpt")
    assert code == 2 and "'.safetensors'" in err and "Loading" not in err
    code, _, err = run_cli(*EDIT, "--model", "demo-flux", "--output-single-file", tmp_path / "flux.safetensors")
    assert code == 2 and "single-file export supports Stable Diffusion 1.x/2.x and SDXL" in err
    assert "Solving" not in err  # refused once the family is known, before the solve
    assert list(tmp_path.iterdir()) == []


def test_help_lists_the_option():
    code, out, _ = run_cli("edit", "--help")
    assert code == 0 and "--output-single-file PATH" in out and "AUTOMATIC1111" in out

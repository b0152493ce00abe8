"""The `diffusers-uce` command line, end to end on the tiny offline demo pipelines (in-process, plus one subprocess)."""

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

from diffusers_uce.cli import main
from diffusers_uce.demo import make_demo_pipeline

EDIT_OPTIONS = [
    "--model", "--erase", "--guide", "--preserve", "--erase-scale", "--preserve-scale", "--lamb", "--token-mode",
    "--technique", "--no-edit-keys", "--held-out", "--output", "--overwrite", "--device", "--dtype", "--seed",
    "--save-edits", "--lora", "--rank", "--push-to-hub", "--private", "--token", "--create-pr", "--commit-message",
]


def run_cli(*argv):
    """`main(argv)` with stdout/stderr captured: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def edited_names(name):
    return name.endswith(("attn2.to_k.weight", "attn2.to_v.weight"))


def state_dicts(pipe):
    return {f"{c}.{k}": v for c in ("unet", "text_encoder", "vae") for k, v in getattr(pipe, c).state_dict().items()}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One `edit --output` run on the sd1 demo, shared by the tests that inspect its results."""
    out_dir = tmp_path_factory.mktemp("cli") / "edited"
    result = run_cli("edit", "--erase", "van gogh; picasso", "--guide", "art", "--preserve", "monet",
                     "--held-out", "a cat; a red car", "--device", "cpu", "--output", out_dir)
    return out_dir, result


def test_edit_prints_report_and_progress(saved):
    _, (code, out, err) = saved
    assert code == 0, err
    for text in ("van gogh", "picasso", "→ art", "monet", "a cat", "a red car", "efficacy", "interference"):
        assert text in out
    assert "Loading model demo" in err and "Solving" in err and "saving to" in err


def test_saved_folder_is_a_plain_pipeline_with_only_attn2_changed(saved):
    out_dir, _ = saved
    assert json.loads((out_dir / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    loaded = StableDiffusionPipeline.from_pretrained(out_dir)
    assert type(loaded) is StableDiffusionPipeline
    edited, fresh = state_dicts(loaded), state_dicts(make_demo_pipeline("sd1"))
    assert edited.keys() == fresh.keys()
    changed = [k for k in edited if edited_names(k)]
    assert len(changed) == 8  # 4 attn2 modules x (to_k, to_v)
    for name in edited:
        assert torch.equal(edited[name], fresh[name]) != edited_names(name), name


def test_report_json(saved):
    out_dir, (_, out, _) = saved
    data = json.loads((out_dir / "uce_report.json").read_text())
    assert data["model"] == "demo"
    (edit,) = data["edits"]
    assert edit["erase"] == ["van gogh", "picasso"] and edit["guide"] == ["art", "art"]
    assert edit["preserve"] == ["monet"] and edit["lamb"] == 0.5 and edit["token_mode"] == "last"
    report = data["report"]
    assert [r["concept"] for r in report["erased"]] == ["van gogh", "picasso"]
    assert all(r["guide"] == "art" and r["efficacy"] > 0.5 for r in report["erased"])
    assert [r["concept"] for r in report["preserved"]] == ["monet"]
    assert [r["concept"] for r in report["held_out"]] == ["a cat", "a red car"]
    assert report["layers"] == 8 and f"{report['summary']['mean_efficacy']:.4f}" in out
    assert not [p for p in os.listdir(out_dir) if p.endswith(".tmp")]


def test_local_folder_model(saved):
    out_dir, _ = saved
    code, out, err = run_cli("edit", "--model", out_dir, "--erase", "monet", "--guide", "art", "--held-out", "")
    assert code == 0, err
    assert "monet" in out and "Loading model" in err


def test_unsupported_pipeline_class_is_a_one_line_error(tmp_path):
    StableDiffusionImg2ImgPipeline(**make_demo_pipeline().components).save_pretrained(tmp_path / "img2img")
    code, out, err = run_cli("edit", "--model", tmp_path / "img2img", "--erase", "van gogh")
    assert code == 2 and out == ""
    (line,) = [line for line in err.splitlines() if "error:" in line]
    assert line.startswith("diffusers-uce: error:") and "StableDiffusionImg2ImgPipeline" in line
    assert "Traceback" not in err


def test_demo_sd2(tmp_path):
    code, out, err = run_cli("edit", "--model", "demo-sd2", "--erase", "van gogh", "--guide", "art",
                             "--output", tmp_path / "sd2")
    assert code == 0, err
    assert "van gogh" in out
    loaded = StableDiffusionPipeline.from_pretrained(tmp_path / "sd2")
    assert loaded.text_encoder.config.hidden_size == 48 and loaded.scheduler.config.prediction_type == "v_prediction"
    assert json.loads((tmp_path / "sd2" / "uce_report.json").read_text())["model"] == "demo-sd2"


def test_paper_tensor_and_no_edit_keys(tmp_path):
    code, out, err = run_cli("edit", "--erase", "van gogh", "--guide", "art", "--preserve", "monet",
                             "--token-mode", "paper", "--technique", "tensor", "--no-edit-keys", "--output", tmp_path)
    assert code == 0, err
    (edit,) = json.loads((tmp_path / "uce_report.json").read_text())["edits"]
    assert (edit["token_mode"], edit["technique"], edit["preserve_scale"]) == ("paper", "tensor", 0.5)
    edited, fresh = state_dicts(StableDiffusionPipeline.from_pretrained(tmp_path)), state_dicts(make_demo_pipeline())
    for name in edited:
        assert torch.equal(edited[name], fresh[name]) != name.endswith("attn2.to_v.weight"), name


def test_lists_split_on_semicolons_and_empty_guide_is_unconditional():
    code, out, err = run_cli("edit", "--erase", " kinkade, thomas ;; picasso ", "--guide", " ", "--held-out", "")
    assert code == 0, err
    assert "kinkade, thomas" in out and "picasso" in out and "<unconditional>" in out
    assert not [line for line in out.splitlines() if line.startswith("held-out")]  # --held-out "": no rows


def test_refuses_non_empty_output_unless_overwrite(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    code, out, err = run_cli("edit", "--erase", "van gogh", "--output", tmp_path)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and "--overwrite" in err and "Loading" not in err
    assert os.listdir(tmp_path) == ["keep.txt"]

    code, _, err = run_cli("edit", "--erase", "van gogh", "--output", tmp_path, "--overwrite")
    assert code == 0, err
    assert (tmp_path / "model_index.json").is_file() and (tmp_path / "uce_report.json").is_file()
    assert (tmp_path / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("args, reason", [
    (["--erase", "van gogh", "--token-mode", "middle"], "--token-mode"),
    (["--erase", "van gogh", "--lamb", "0"], "lamb must be > 0"),
    (["--erase", " ; "], "--erase"),
    (["--erase", "a; b; c", "--guide", "x; y"], "guide has 2 entries but erase has 3"),
    (["--erase", "van gogh", "--model", "{tmp}/missing/model"], "no such folder"),
    (["--erase", "van gogh", "--device", "gpu"], "--device"),
    (["--erase", "van gogh", "--dtype", "int8"], "--dtype"),
    (["--guide", "art"], "--erase"),
])
def test_bad_arguments_exit_2_with_one_line(tmp_path, args, reason):
    code, out, err = run_cli("edit", *[a.format(tmp=tmp_path) for a in args])
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("diffusers-uce") and "error:" in lines[0], err
    assert reason in lines[0] and "Loading" not in err


def test_help_mentions_every_option():
    code, out, _ = run_cli("edit", "--help")
    assert code == 0
    for option in EDIT_OPTIONS:
        assert option in out, option
    assert "(default: 0.5)" in out and "(default: demo)" in out and "examples:" in out
    code, out, _ = run_cli("--help")
    assert code == 0 and "edit" in out and "diffusers-uce edit --erase" in out
    assert run_cli()[0] == 2


def test_console_script():
    script = Path(sys.executable).with_name("diffusers-uce")
    script = str(script) if script.exists() else shutil.which("diffusers-uce")
    command = [script] if script else [sys.executable, "-m", "diffusers_uce.cli"]
    result = subprocess.run([*command, "edit", "--erase", "van gogh", "--guide", "art"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "van gogh" in result.stdout and "→ art" in result.stdout and "efficacy" in result.stdout


def test_save_edits_lora_and_push(tmp_path, hub_server):
    from huggingface_hub import HfApi, ModelCard

    edits, lora = tmp_path / "edits", tmp_path / "lora"
    code, _, err = run_cli("edit", "--erase", "van gogh; picasso", "--guide", "art", "--save-edits", edits,
                           "--lora", lora, "--rank", "1", "--push-to-hub", "user/cli-edit")
    assert code == 0, err
    assert (edits / "uce_edits.safetensors").is_file() and "uce" in ModelCard.load(edits / "README.md").data.tags
    assert (lora / "pytorch_lora_weights.safetensors").is_file() and "relative error" in err
    api = HfApi()
    assert {"uce_edits.safetensors", "README.md", "pipeline.py"} <= set(api.list_repo_files("user/cli-edit"))
    code, out, err = run_cli("push", edits, "user/cli-pushed", "--commit-message", "from the cli")
    assert code == 0, err
    assert "uce_edits.safetensors" in api.list_repo_files("user/cli-pushed") and "cli-pushed" in out


def test_push_refuses_foreign_folders(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"pickle")
    code, _, err = run_cli("push", tmp_path, "user/x")
    assert code == 2 and "pickle" in err
    (tmp_path / "model.bin").unlink()
    code, _, err = run_cli("push", tmp_path, "user/x")
    assert code == 2 and "neither a pipeline" in err
    code, _, err = run_cli("edit", "--erase", "a", "--rank", "2")
    assert code == 2 and "--rank only applies with --lora" in err


def test_moderate_and_expand_flags(tmp_path):
    (tmp_path / "artists.txt").write_text("van gogh\npicasso\n")
    code, out, err = run_cli("edit", "--moderate", "nudity", "--erase", f"@{tmp_path / 'artists.txt'}",
                             "--guide", "art", "--expand-prompts", "art", "--output", tmp_path / "out")
    assert code == 0, err
    record = json.loads((tmp_path / "out" / "uce_report.json").read_text())["edits"][-1]
    assert record["erase"][:2] == ["van gogh", "painting by van gogh"] and len(record["erase"]) == 18
    assert record["erase"][12] == "nudity" and record["guide"][12:] == [""] * 6
    assert record["preserve_scale"] == 0.1
    code, _, err = run_cli("edit", "--moderate", "i2p-v9")
    assert code == 2 and "unknown preset" in err

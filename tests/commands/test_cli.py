"""The `diffusers-uce` command line, end to end on the tiny offline demo pipelines of every family (in-process, plus
one subprocess)."""

import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
from diffusers import (
    DiffusionPipeline,
    FluxImg2ImgPipeline,
    FluxPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
)
from huggingface_hub import ModelCard
from safetensors import safe_open

import diffusers_uce
from diffusers_uce.commands.common import DEMO_MODELS
from diffusers_uce.demo import make_demo_pipeline
from tests.support.helpers import rel, run_cli, target_layers, weights

EDIT_OPTIONS = [
    "--model", "--erase", "--guide", "--preserve", "--erase-scale", "--preserve-scale", "--lamb", "--token-mode",
    "--technique", "--no-edit-keys", "--held-out", "--output", "--overwrite", "--device", "--dtype", "--seed",
    "--save-edits", "--lora", "--rank", "--push-to-hub", "--private", "--token", "--create-pr", "--commit-message",
    "--base-model", "--license",
]


DEMO_NAME = {family: name for name, family in DEMO_MODELS.items()}
BASE_CLASSES = {"sd1": StableDiffusionPipeline, "sd2": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline,
                "flux": FluxPipeline}
FAMILY_TAG = {"sd1": "stable-diffusion", "sd2": "stable-diffusion", "sdxl": "stable-diffusion-xl", "flux": "flux"}


def edited_names(name):
    return name.endswith(("attn2.to_k.weight", "attn2.to_v.weight"))


def state_dicts(pipe):
    """Every tensor of every model of the pipeline, by ``<component>.<name>``."""
    return {f"{c}.{k}": v for c, model in pipe.components.items() if isinstance(model, torch.nn.Module)
            for k, v in model.state_dict().items()}


def edited_tensors(pipe):
    """The ``<component>.<layer>.weight`` names of the layers concept editing changes in `pipe`'s family."""
    component = "transformer" if isinstance(pipe, FluxPipeline) else "unet"
    return {f"{component}.{name}.weight" for name, _ in target_layers(pipe)}


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


@pytest.mark.parametrize("family, cls", [("sd1", StableDiffusionImg2ImgPipeline),
                                         ("sdxl", StableDiffusionXLImg2ImgPipeline), ("flux", FluxImg2ImgPipeline)])
def test_unsupported_pipeline_class_is_a_one_line_error(family, cls, tmp_path):
    folder = tmp_path / "img2img"
    cls(**make_demo_pipeline(family).components).save_pretrained(folder)
    shutil.rmtree(folder / ("transformer" if family == "flux" else "unet"))  # refused before any weights are read
    code, out, err = run_cli("edit", "--model", folder, "--erase", "van gogh")
    assert code == 2 and out == ""
    (line,) = [line for line in err.splitlines() if "error:" in line]
    assert line.startswith("diffusers-uce: error:") and f"is a {cls.__name__}, which diffusers-uce cannot edit" in line
    assert "StableDiffusionXLPipeline, FluxPipeline, StableDiffusion3Pipeline" in line and "Traceback" not in err


def test_every_family_end_to_end(family, tmp_path):
    """`edit --model demo-<family> --output DIR` saves the family's plain diffusers pipeline, different from the demo
    in exactly the edited layers, which hold the plugin's fused edit; DIR then works as `--model` (a local folder)."""
    name, base, out_dir = DEMO_NAME[family], BASE_CLASSES[family], tmp_path / "edited"
    code, out, err = run_cli("edit", "--model", name, "--erase", "van gogh", "--guide", "art", "--preserve", "monet",
                             "--device", "cpu", "--output", out_dir)
    assert code == 0, err
    assert "van gogh" in out and "→ art" in out and f"Loading model {name} (float32, cpu)" in err
    assert json.loads((out_dir / "model_index.json").read_text())["_class_name"] == base.__name__
    assert json.loads((out_dir / "uce_report.json").read_text())["model"] == name
    card = ModelCard.load(out_dir / "README.md").data
    assert FAMILY_TAG[family] in card.tags and card.base_model is None  # a demo has no Hub id
    loaded = DiffusionPipeline.from_pretrained(out_dir)
    assert type(loaded) is base

    plugin = diffusers_uce.attach(make_demo_pipeline(family))
    plugin.apply_concept_edits("van gogh", guide="art", preserve=["monet"], held_out=[])
    plugin.fuse_concept_edits()
    saved, fresh, expected = state_dicts(loaded), state_dicts(make_demo_pipeline(family)), state_dicts(plugin)
    changed = edited_tensors(loaded)
    assert saved.keys() == fresh.keys() and changed and changed <= saved.keys()
    for tensor in saved:
        assert torch.equal(saved[tensor], fresh[tensor]) != (tensor in changed), tensor
    # (the held-out concepts are encoded in the same batches as the edit's, which moves float rounding only)
    assert max(rel(saved[tensor], expected[tensor]) for tensor in changed) < 1e-5

    code, out, err = run_cli("edit", "--model", out_dir, "--erase", "monet", "--guide", "art", "--held-out", "",
                             "--save-edits", tmp_path / "again")
    assert code == 0, err
    assert FAMILY_TAG[family] in ModelCard.load(tmp_path / "again" / "README.md").data.tags


def test_hub_model_id(family, hub_server, hub_token, tmp_path):
    """`--model user/repo` loads any family from the Hub; the edit's card names that repo as its base model."""
    from huggingface_hub import HfApi

    repo_id = f"user/tiny-{family}-{uuid.uuid4().hex[:8]}"
    make_demo_pipeline(family).save_pretrained(tmp_path / "base")
    api = HfApi(token=hub_token)
    api.create_repo(repo_id)
    api.upload_folder(repo_id=repo_id, folder_path=tmp_path / "base")
    code, out, err = run_cli("edit", "--model", repo_id, "--erase", "van gogh", "--guide", "art", "--held-out", "",
                             "--save-edits", tmp_path / "edit")
    assert code == 0, err
    card = ModelCard.load(tmp_path / "edit" / "README.md").data
    assert (card.base_model, card.base_model_relation) == (repo_id, "adapter") and FAMILY_TAG[family] in card.tags


@pytest.mark.parametrize("family", ["sd1", "flux"])
def test_dtype_and_device(family, tmp_path):
    """--dtype: the model is loaded, edited and saved in it; --device: an unusable CUDA device is one error line."""
    code, _, err = run_cli("edit", "--model", DEMO_NAME[family], "--erase", "van gogh", "--guide", "art",
                           "--held-out", "", "--dtype", "bfloat16", "--device", "cpu", "--output", tmp_path)
    assert code == 0, err
    assert "(bfloat16, cpu)" in err
    denoiser = "transformer" if family == "flux" else "unet"
    with safe_open(tmp_path / denoiser / "diffusion_pytorch_model.safetensors", "pt") as stored:
        assert {stored.get_slice(k).get_dtype() for k in stored.keys()} == {"BF16"}
    plugin = diffusers_uce.attach(make_demo_pipeline(family, torch_dtype=torch.bfloat16))
    plugin.apply_concept_edits("van gogh", guide="art", held_out=[])
    plugin.fuse_concept_edits()
    loaded = DiffusionPipeline.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert all(torch.equal(w, weights(plugin)[n]) for n, w in weights(loaded).items())

    code, out, err = run_cli("edit", "--erase", "van gogh", "--device", "cuda:99")
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert re.search(r"--device cuda:99: (CUDA is not available here|only \d+ CUDA device)", err)
    assert "Loading" not in err


def test_no_edit_keys_needs_key_projections():
    code, out, err = run_cli("edit", "--model", "demo-flux", "--erase", "van gogh", "--no-edit-keys")
    assert code == 2 and out == ""
    assert "--no-edit-keys: demo-flux is a flux pipeline" in err and "drop the flag" in err


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
    flat = " ".join(out.split())
    assert "'demo-sdxl' (sdxl), 'demo-flux' (flux)" in flat and "StableDiffusionXLPipeline, FluxPipeline" in flat
    assert "--model demo-flux" in out
    code, out, _ = run_cli("eval", "--help")
    assert code == 0 and "demo-flux" in out and "FluxPipeline" in " ".join(out.split())
    code, out, _ = run_cli("--help")
    assert code == 0 and "edit" in out and "diffusers-uce edit --erase" in out
    assert run_cli()[0] == 2


def test_console_script():
    script = Path(sys.executable).with_name("diffusers-uce")
    script = str(script) if script.exists() else shutil.which("diffusers-uce")
    command = [script] if script else [sys.executable, "-m", "diffusers_uce.commands.uce_cli"]
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


def test_edit_with_precise_erasure_and_a_retain_vocabulary(tmp_path):
    code, out, err = run_cli("edit", "--erase", "Van Gogh", "--guide", "art", "--preserve",
                             "@retain:celebrities; Monet", "--method", "speed", "--method-option", "threshold=0.01",
                             "--method-option", "filter=false", "--save-edits", tmp_path / "edit", "--held-out", "")
    assert code == 0, err
    assert "precise erasure: largest change of the 4 invariant tokens" in out
    pipe = diffusers_uce.attach(make_demo_pipeline("sd1"))
    pipe.load_concept_edits(tmp_path / "edit")
    record = pipe.concept_edits[0]
    assert record.method == "speed" and record.method_options["filter"] is False and len(record.preserve) == 101


@pytest.mark.parametrize("argv, message", [
    (["--method-option", "threshold=0.1"], "--method uce takes no --method-option"),
    (["--method", "speed", "--method-option", "tau=1"], "unknown --method-option"),
    (["--method", "speed", "--preserve", "@retain:painters"], "unknown retain set"),
    (["--method", "speed", "--lamb", "0.2"], "lamb"),
])
def test_edit_refuses_bad_precise_erasure_flags(argv, message):
    code, _, err = run_cli("edit", "--erase", "Van Gogh", *argv)
    assert code == 2 and message in err


def test_help_does_not_import_torch_or_diffusers():
    """`diffusers-uce --help` starts in well under a second: building every subcommand's parser imports nothing
    heavy (torch and diffusers load when a command runs)."""
    import subprocess
    import sys

    code = ("import sys\nfrom diffusers_uce.commands.uce_cli import build_parser\nbuild_parser().format_help()\n"
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_hub_id_offline_fails_fast_with_a_hint(monkeypatch):
    import socket
    import time

    from huggingface_hub import constants

    with socket.socket() as s:  # a port nothing listens on: the Hub is unreachable
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    t0 = time.perf_counter()
    code, _, err = run_cli("edit", "--model", "someone/not-cached-model", "--erase", "van gogh")
    assert code == 2 and "cannot be reached" in err and "local folder" in err
    assert time.perf_counter() - t0 < 15


def test_overwrite_rewrites_the_card_with_the_output(tmp_path):
    """With --overwrite, the card in each folder describes the edit written there now, like uce_report.json."""
    for concept in ("van gogh", "picasso"):
        code, _, err = run_cli("edit", "--erase", concept, "--guide", "art", "--output", tmp_path / "out",
                               "--save-edits", tmp_path / "edit", "--lora", tmp_path / "lora", "--overwrite")
        assert code == 0, err
    for folder in ("out", "edit", "lora"):
        card = (tmp_path / folder / "README.md").read_text()
        assert "picasso" in card and "van gogh" not in card, folder
    assert json.loads((tmp_path / "out" / "uce_report.json").read_text())["edits"][0]["erase"] == ["picasso"]

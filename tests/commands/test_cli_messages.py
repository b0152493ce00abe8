"""The command line's messages: flags named as typed, "did you mean", missing folders, one-line failures, the Hub
loading options and the dtype default."""

import time

import pytest

from diffusers_uce.commands.common import resolve_dtype
from diffusers_uce.commands.messages import flag_names
from diffusers_uce.commands.uce_cli import build_parser
from diffusers_uce.demo import make_demo_pipeline
from tests.support.helpers import run_cli


def error_line(err):
    (line,) = [line for line in err.splitlines() if "error:" in line]
    return line


def test_unknown_flag_suggests_the_closest_one():
    code, out, err = run_cli("edit", "--erse", "van gogh", "--gide=art")
    assert code == 2 and out == ""
    line = error_line(err)
    assert "--erse (did you mean --erase?)" in line and "--gide=art (did you mean --guide?)" in line


@pytest.mark.parametrize("argv, flag, python", [
    (["--technique", "tensor", "--harden", "1"], "--technique replace", "technique="),
    (["--method", "speed", "--method-option", "threshold=-1"], "--method-option threshold", "method_options"),
])
def test_errors_name_the_flags_not_python_arguments(argv, flag, python):
    code, _, err = run_cli("edit", "--erase", "van gogh", *argv)
    line = error_line(err)
    assert code == 2 and flag in line and python not in line


def test_flag_names_rewrites_python_spellings():
    assert flag_names("use technique='replace' and lamb=0.5") == "use --technique replace and --lamb 0.5"
    assert flag_names("pass edit_keys=False, or set preserve_scale") == "pass --no-edit-keys, or set --preserve-scale"
    assert flag_names("harden_options['reg'] must be > 0") == "--harden-reg must be > 0"


def test_missing_local_folder_says_so(tmp_path):
    for model in ("./no-such-folder", str(tmp_path / "missing")):
        code, _, err = run_cli("edit", "--model", model, "--erase", "van gogh")
        line = error_line(err)
        assert code == 2 and "no such folder" in line and "alphanumeric" not in line


def test_failed_push_is_one_line_and_debug_adds_the_traceback(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens on port 9
    argv = ("edit", "--erase", "van gogh", "--held-out", "", "--push-to-hub", "me/x", "--token", "hf_x")
    code, _, err = run_cli(*argv)
    assert code == 2 and "Traceback" not in err
    (line,) = [line for line in err.splitlines() if "failed" in line or "error" in line]
    assert line.startswith("diffusers-uce: error:") and "pushing to me/x failed" in line
    code, _, err = run_cli(*argv, "--debug")
    assert code == 2 and "Traceback" in err


def test_model_loading_options_on_every_model_command_and_dtype_default(tmp_path):
    parser = build_parser()
    for name in ("edit", "eval"):
        options = {o for a in parser.subcommands[name]._actions for o in a.option_strings}
        assert {"--revision", "--variant", "--cache-dir", "--local-files-only", "--debug"} <= options
    assert resolve_dtype(None, "cuda:0") == "float16" and resolve_dtype(None, "cpu") == "float32"
    assert resolve_dtype("bfloat16", "cuda") == "bfloat16"
    folder = tmp_path / "sd"
    make_demo_pipeline("sd1").save_pretrained(folder, variant="fp16")
    code, out, err = run_cli("edit", "--model", folder, "--variant", "fp16", "--local-files-only", "--erase",
                             "van gogh", "--held-out", "", "--device", "cpu")
    assert code == 0, err
    assert "(float32, cpu)" in err and "efficacy" in out
    code, _, err = run_cli("edit", "--revision", "v1", "--erase", "van gogh")
    assert code == 2 and "--revision apply to a Hub model" in error_line(err)


def test_uncached_model_fails_fast_when_the_hub_is_unreachable(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    start = time.perf_counter()
    code, _, err = run_cli("edit", "--model", "someone/not-cached", "--erase", "van gogh")
    assert time.perf_counter() - start < 5
    line = error_line(err)
    assert code == 2 and "cannot be reached" in line and "give a local folder" in line
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    code, _, err = run_cli("edit", "--model", "someone/not-cached", "--erase", "van gogh")
    assert code == 2 and "HF_HUB_OFFLINE is set" in error_line(err)

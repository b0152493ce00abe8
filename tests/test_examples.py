"""The examples: self-contained (data from the package or an argument), a quick `--help` with help texts, an offline
demo run; evaluate_edit refuses a pipeline whose safety checker would blacken images."""

import argparse
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import diffusers_uce
from diffusers_uce.demo import make_demo_pipeline
from diffusers_uce.evaluation.evaluate import evaluate_edit
from diffusers_uce.evaluation.robust_sets import robust_prompt_set_path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))


def load_example(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_help_is_quick_and_explains_every_option(path, monkeypatch):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for _attempt in range(2):  # one retry: a loaded CI machine may stall a process start
        start = time.perf_counter()
        done = subprocess.run([sys.executable, str(path), "--help"], capture_output=True, text=True, env=env,
                              timeout=60)
        elapsed = time.perf_counter() - start
        if elapsed < 2:
            break
    assert done.returncode == 0, done.stderr
    assert elapsed < 2, f"{path.name} --help took {elapsed:.1f} s"
    parsers = []
    monkeypatch.setattr(argparse.ArgumentParser, "print_help", lambda self, file=None: parsers.append(self))
    with pytest.raises(SystemExit):
        load_example(path.stem).main(["--help"])
    (parser,) = parsers
    undocumented = [a.option_strings or a.dest for a in parser._actions if not a.help]
    assert not undocumented, undocumented
    models = [a for a in parser._actions if "--model" in a.option_strings]
    assert all("'demo'" in a.help for a in models)  # every example that loads a model runs on the demo pipeline


def test_examples_read_no_file_outside_the_repository():
    for path in EXAMPLES:
        text = path.read_text()
        assert "../shared" not in text and "shared/data" not in text and "parents[2]" not in text, path.name
        assert 'default="data' not in text, path.name  # no default path that a clone does not have


def test_moderate_nudity_demo_run_offline(tmp_path, capsys):
    module = load_example("moderate_nudity")
    module.main(["--model", "demo", "--limit", "2", "--steps", "1", "--size", "16", "--device", "cpu", "--output",
                 str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert "weights are random" in out and "nudenet" in out
    assert (tmp_path / "out" / "uce_edits.safetensors").is_file()
    assert (tmp_path / "out" / "eval" / "summary.json").is_file()


def test_evaluate_edit_refuses_an_active_safety_checker(tmp_path):
    pipe = diffusers_uce.attach(make_demo_pipeline("sd1"))
    pipe.apply_concept_edits("nudity")
    pipe.safety_checker = object()  # stands for StableDiffusionSafetyChecker: nothing may be generated
    with pytest.raises(ValueError, match="allow_safety_checker=True"):
        evaluate_edit(pipe, robust_prompt_set_path("i2p-nudity"), tmp_path / "eval", limit=1)
    assert not (tmp_path / "eval").exists()

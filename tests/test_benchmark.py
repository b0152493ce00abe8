"""Smoke test of benchmarks/edit_speed.py: its baseline and the package agree on the tiny demo pipeline."""

import importlib.util
from pathlib import Path

import pytest
import torch

import diffusers_uce
from diffusers_uce.demo import make_demo_pipeline

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "edit_speed.py"
_spec = importlib.util.spec_from_file_location("edit_speed", _PATH)
edit_speed = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(edit_speed)

ERASE = ["van gogh", "picasso", "salvador dali"]
PRESERVE = ["monet", "rembrandt", "a photo of a dog"]


@pytest.fixture(scope="module")
def pipe():
    return diffusers_uce.attach(make_demo_pipeline("sd1"))


@pytest.mark.parametrize("mode", ["last", "paper"])
def test_baseline_matches_package(pipe, mode):
    original = edit_speed.projection_weights(pipe)
    (apply_s, fuse_s), fused = edit_speed.time_package(pipe, ERASE, PRESERVE, mode, "cpu", repeats=1)
    assert apply_s > 0 and fuse_s > 0
    assert pipe.concept_edits == ()  # time_package unloads after each run
    assert all(torch.equal(w, original[n]) for n, w in edit_speed.projection_weights(pipe).items())

    edited, tokens = edit_speed.run_baseline(pipe, original, ERASE, PRESERVE, mode)
    assert tokens == edit_speed.solve_tokens(pipe.tokenizer, ERASE, PRESERVE, mode)
    assert tokens == 6 if mode == "last" else tokens > 77 * 4  # one per concept / blocks + 77 per preserved prompt
    err, delta_err = edit_speed.max_relative_error(fused, edited, original)
    assert err < 1e-4 and delta_err < 1e-3
    # the edit is not trivially small: a wrong baseline or package would show
    assert max(float((edited[n] - original[n].double()).norm() / original[n].double().norm()) for n in edited) > 1e-3

"""Smoke tests of benchmarks/precise_speed.py (tiny shapes: its per-layer baseline matches the package) and of
examples/precise_erasure.py (import and --help only: real-model runs are for users)."""

import importlib.util

import pytest

from tests.support import REPO


def load(path, name):
    spec = importlib.util.spec_from_file_location(name, REPO / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_baseline_matches_the_package(tmp_path):
    bench = load("benchmarks/precise_speed.py", "precise_speed")
    output = tmp_path / "RESULTS.md"
    rows = bench.main(["--tiny", "--sizes", "3", "--baseline-sizes", "3", "--output", str(output)])
    assert rows[0]["delta_diff"] < 1e-8
    assert rows[0]["speed_invariant"] < 1e-6
    text = output.read_text()
    assert "## Precise erasure (SPEED) vs UCE, SD 1.5 shapes" in text and "| 3 | SPEED |" in text


def test_example_parses_its_arguments(capsys):
    example = load("examples/precise_erasure.py", "precise_erasure")
    with pytest.raises(SystemExit) as exit_info:
        example.main(["--help"])
    assert exit_info.value.code == 0 and "--sizes" in capsys.readouterr().out
    assert len(example.benchmark_rows(10)) == 1000

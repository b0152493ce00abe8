"""Smoke runs of benchmarks/gpu_speed.py on the CPU (tiny shapes): every part runs and writes its GPU section, so the
script that benchmarks/gpu_check.sh runs on a GPU cannot rot unnoticed."""

import importlib.util

import pytest

from tests.support import REPO

_PATH = REPO / "benchmarks" / "gpu_speed.py"
_spec = importlib.util.spec_from_file_location("gpu_speed", _PATH)
gpu_speed = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_speed)

KEPT = "## Notes by hand\n\nkept as it is\n"


def test_smoke_edit_generation_memory(tmp_path):
    output = tmp_path / "RESULTS.md"
    output.write_text("# Results\n\n" + KEPT, encoding="utf-8")
    gpu_speed.main(["--smoke", "--device", "cpu", "--parts", "edit", "generation", "memory", "--families", "sd15",
                    "sdxl", "--output", str(output)])
    text = output.read_text(encoding="utf-8")
    assert "## GPU" in text and KEPT.strip() in text and "Smoke run" in text
    assert "| 4 |" in text  # the edit-time row of N = 4
    for mode in ("plain", "processor", "fused"):
        assert text.count(f"| {mode} |") == 2  # SD 1.5 and SDXL
    assert "| SDXL |" in text and "not measured on cpu" in text


@pytest.mark.slow
def test_smoke_compile_compiles_once_per_phase(tmp_path):
    """With an edit in processor mode and fused, the second generation of each phase compiles nothing."""
    gpu_speed.main(["--smoke", "--device", "cpu", "--parts", "compile", "--output", str(tmp_path / "R.md")])
    result = gpu_speed.bench_compile.result
    assert set(result) == {"plain", "processor", "fused"}
    assert result["plain"][0] >= 1 and all(then == 0 for _, then in result.values()), result
    assert result["processor"][0] == 1  # the new processors are one guard; their device terms exist before tracing

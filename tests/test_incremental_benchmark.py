"""Smoke test of benchmarks/incremental_speed.py on tiny shapes: the cached re-solve is the cheap one."""

import importlib.util

from tests.support import REPO


def test_incremental_benchmark_runs_and_writes_its_section(tmp_path):
    spec = importlib.util.spec_from_file_location("incremental_speed", REPO / "benchmarks/incremental_speed.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    output = tmp_path / "RESULTS.md"
    times, startup = bench.main(["--erase", "3", "--tiny", "--output", str(output)])
    assert set(times) == {"first call", "add one concept, without cache", "add one concept, with cache"}
    assert startup > 0 and "## Incremental re-solves and start-up" in output.read_text()

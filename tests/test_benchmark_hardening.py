"""Smoke test of benchmarks/hardening_speed.py on tiny shapes: the per-layer round agrees with the package, and only
its own section of RESULTS.md is written."""

import importlib.util

from tests.support import REPO

_spec = importlib.util.spec_from_file_location("hardening_speed", REPO / "benchmarks" / "hardening_speed.py")
hardening_speed = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(hardening_speed)


def test_tiny_run(tmp_path, monkeypatch):
    monkeypatch.setattr(hardening_speed, "names", lambda n: [f"painter number {i}" for i in range(n)])
    output = tmp_path / "RESULTS.md"
    output.write_text("# Edit speed\n\n## Other\n\nkept\n", encoding="utf-8")
    rows = hardening_speed.main(["--tiny", "--sizes", "1", "2", "--repeats", "1", "--modes", "paper",
                                 "--threads", "1", "--output", str(output)])
    assert [(r["mode"], r["n"], r["tokens"]) for r in rows] == [("paper", 1, 77), ("paper", 2, 154)]
    assert all(r["delta_err"] < 1e-2 and r["package"] > 0 and r["per_layer"] > 0 for r in rows)
    text = output.read_text(encoding="utf-8")
    assert "## Other\n\nkept" in text and f"## {hardening_speed.HEADING}" in text and "| paper | 2 | 154 |" in text

"""`diffusers-uce edit --harden K`: hardened edits from the command line, their report and their refusals."""

import json
import re

from tests.support.helpers import run_cli


def test_harden_prints_robustness_and_stores_rounds(tmp_path):
    code, out, err = run_cli("edit", "--erase", "van gogh; picasso", "--guide", "art", "--token-mode", "paper",
                             "--harden", "2", "--held-out", "", "--output", tmp_path / "out")
    assert code == 0, err
    assert "robustness (adversarial recovery" in out
    assert re.search(r"^van gogh\s+0\.1\s+2\s+(-?[\d.]+ → ){2}-?[\d.]+\s", out, re.M)
    saved = json.loads((tmp_path / "out" / "uce_report.json").read_text())
    assert saved["edits"][-1]["harden"]["rounds"] == 2 and saved["edits"][-1]["harden"]["reg"] == 0.1
    assert [len(r["recovery"]) for r in saved["report"]["robustness"]] == [3, 3]


def test_harden_presets_and_refusals(tmp_path):
    code, out, err = run_cli("edit", "--erase", "van gogh", "--guide", "art", "--expand-prompts", "art", "--harden",
                             "1", "--held-out", "", "--save-edits", tmp_path / "edit")
    assert code == 0, err
    assert re.search(r"^van gogh\s+0\.001\s+1\s", out, re.M)  # artists: the authors' rho
    card = (tmp_path / "edit" / "README.md").read_text()
    assert "hardened: 1 round, ρ 0.001" in card and "adversarial recovery" in card
    for args, reason in ((["--erase", "dog", "--harden", "-1"], "harden"),
                         (["--erase", "dog", "--harden-reg", "0.1"], "--harden-reg"),
                         (["--erase", "dog", "--harden", "1", "--harden-reg", "0"], "reg"),
                         (["--erase", "dog", "--harden", "1", "--technique", "tensor"], "tensor")):
        code, out, err = run_cli("edit", *args)
        assert code == 2 and reason in err and "Loading" not in err, err

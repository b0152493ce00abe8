"""Smoke tests of benchmarks/edit_speed.py: its float64 baseline and the package agree (tiny SD 1.5 demo pipeline and
the benchmark's own tiny SDXL / FLUX shapes), the real shapes are those of the checkpoints named, and RESULTS.md is
rewritten one section at a time."""

import importlib.util

import pytest
import torch
from diffusers import FluxTransformer2DModel, UNet2DConditionModel

import diffusers_uce
from diffusers_uce.demo import make_demo_pipeline
from tests.support import REPO

_PATH = REPO / "benchmarks" / "edit_speed.py"
_spec = importlib.util.spec_from_file_location("edit_speed", _PATH)
edit_speed = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(edit_speed)
shapes, results_md = edit_speed.shapes, edit_speed.results_md

ERASE = ["van gogh", "picasso", "salvador dali"]
PRESERVE = ["monet", "rembrandt", "a photo of a dog"]


@pytest.fixture(scope="module")
def pipe():
    return diffusers_uce.attach(make_demo_pipeline("sd1"))


@pytest.mark.parametrize("mode", ["last", "paper"])
def test_baseline_matches_package(pipe, mode):
    original = edit_speed.projection_weights(pipe)
    times, fused = edit_speed.time_package(pipe, ERASE, PRESERVE, mode, "cpu", repeats=1)
    assert times["apply"] > times["encode"] > 0 and times["fuse"] > 0
    assert pipe.concept_edits == ()  # time_package unloads after each run
    assert all(torch.equal(w, original[n]) for n, w in edit_speed.projection_weights(pipe).items())

    edited, tokens = edit_speed.run_baseline(pipe, original, ERASE, PRESERVE, mode)
    assert tokens == edit_speed.solve_tokens(pipe.tokenizer, ERASE, PRESERVE, mode)
    assert tokens == 6 if mode == "last" else tokens > 77 * 4  # one per concept / blocks + 77 per preserved prompt
    err, delta_err = edit_speed.max_relative_error(fused, edited, original)
    assert err < 1e-4 and delta_err < 1e-3
    # the edit is not trivially small: a wrong baseline or package would show
    assert max(float((edited[n] - original[n].double()).norm() / original[n].double().norm()) for n in edited) > 1e-3


def test_real_shapes():
    """SDXL 1.0 base: 70 attn2 = 140 projections on 2048-wide tokens; FLUX.1-dev: 4096→3072 and 768→3072 layers."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(**shapes.SDXL_UNET)
        transformer = FluxTransformer2DModel(**shapes.FLUX_TRANSFORMER)
    layers = [m for n, m in unet.named_modules() if n.endswith(shapes.ATTN2)]
    assert len(layers) == 140 and {(m.in_features, m.out_features) for m in layers} == {(2048, 640), (2048, 1280)}
    embedders = [transformer.get_submodule(n) for n in shapes.FLUX_LAYERS]
    assert [(m.in_features, m.out_features, m.bias is not None) for m in embedders] == [(4096, 3072, True),
                                                                                         (768, 3072, True)]
    assert shapes.CLIP_BIGG["hidden_size"] + shapes.CLIP_L["hidden_size"] == 2048
    assert shapes.T5_XXL["d_model"] == 4096


OTHER = "## Notes by hand\n\nkept as it is\n"


def test_families_smoke(tmp_path, monkeypatch):
    """`--families sdxl flux --tiny`: every row checked against the float64 baseline; only their sections written."""
    # the concept names, not the paper's CSVs (a clone may not have ../shared/data): this tests the family code path
    monkeypatch.setattr(edit_speed, "concepts", lambda n: (ERASE[:n], PRESERVE[:n]))
    output = tmp_path / "RESULTS.md"
    sd15 = results_md.merge_section("", results_md.SD15_HEADING, ["an earlier SD 1.5 run"]) + "\n" + OTHER
    output.write_text(sd15, encoding="utf-8")
    results = edit_speed.main(["--families", "sdxl", "flux", "--tiny", "--family-sizes", "1", "2", "--repeats", "1",
                               "--family-paper-max", "1", "--check-layers", "3", "--threads", "1",
                               "--output", str(output)])
    for family, count in (("sdxl", "3/16"), ("flux", "2/2")):
        rows = results[family]
        assert [(r["mode"], r["n"]) for r in rows] == [("last", 1), ("last", 2), ("paper", 1)]
        assert all(r["checked"] == count and r["err"] < 1e-4 and r["derr"] < 1e-3 for r in rows)
        assert all(0 < r["encode"] < r["apply"] for r in rows)
    assert results["flux"][2]["tokens"] > 512 * 2  # T5 blocks: 512 per preserved prompt ("" added) + the erased one
    text = output.read_text(encoding="utf-8")
    assert text.startswith(sd15.rstrip("\n").rsplit("\n## Notes", 1)[0])  # SD 1.5 section untouched
    assert OTHER in text
    headings = [line for line in text.splitlines() if line.startswith("## ")]
    assert headings == [f"## {results_md.SD15_HEADING}", "## Notes by hand", "## Solve time: SDXL-shaped pipeline",
                        "## Solve time: FLUX-shaped pipeline"]
    assert text.count("| last | 2 |") == 2 and text.count("| paper | 1 |") == 2 and "| paper | 2 |" not in text


LEGACY = """# Edit speed: diffusers_uce vs a straightforward UCE

Machine: old

## Targets

- old verdicts

## Results

| old table |

## Cost against the number of prompt tokens in the solve

- old fit

## "paper" mode (added by hand)

kept
"""


def test_sections_replace_only_their_own():
    family = results_md.FAMILY_HEADING.format("FLUX")
    # an old single-run file: its SD 1.5 run is folded into the SD 1.5 section, the hand-written section kept
    text = results_md.merge_section(LEGACY, family, ["flux v1"])
    preamble, sections = results_md.split_sections(text)
    assert [h for h, _ in sections] == [results_md.SD15_HEADING, '"paper" mode (added by hand)', family]
    sd15_body = "\n".join(sections[0][1])
    assert all(s in sd15_body for s in ("Machine: old", "### Targets", "### Results", "| old table |", "- old fit"))
    assert preamble[0] == results_md.PREAMBLE[0]
    # later runs replace their own section only, in place, and leave the rest byte for byte
    again = results_md.merge_section(text, family, ["flux v2"])
    assert again == text.replace("flux v1", "flux v2")
    sd15_again = results_md.merge_section(again, results_md.SD15_HEADING, ["sd15 v2"], first=True)
    assert [h for h, _ in results_md.split_sections(sd15_again)[1]] == [h for h, _ in sections]
    assert "sd15 v2" in sd15_again and "| old table |" not in sd15_again and "flux v2" in sd15_again
    assert sd15_again.split("## \"paper\" mode")[1] == again.split("## \"paper\" mode")[1]

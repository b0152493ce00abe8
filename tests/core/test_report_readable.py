"""Outputs a person can read: the printed report's tables, summed-up retain sets, the demo note, the card's metric
definitions, the report plot and what `concept_edit_settings` says was edited."""

import pytest
from diffusers import StableDiffusionPipeline

import diffusers_uce
from diffusers_uce.core.report import EditReport
from diffusers_uce.demo import make_demo_pipeline
from diffusers_uce.hub.cards import render_model_card
from tests.support.helpers import run_cli


@pytest.fixture(scope="module")
def hardened():
    pipe = diffusers_uce.attach(make_demo_pipeline("sd1"))
    preserve = diffusers_uce.retain_set("artists")[:30]
    return pipe, pipe.apply_concept_edits("van gogh; picasso", guide="art", preserve=preserve, harden=2,
                                          held_out="a cat")


def test_printed_report_has_a_robustness_table_and_sums_up_retain_sets(hardened):
    pipe, out = hardened
    text = str(out.report)
    main, _, robust = text.partition("robustness (adversarial recovery")
    assert "robustness" not in main and "→" not in main.replace("→ art", "")  # no numbers in the guide column
    header = robust.splitlines()[1]
    assert "concept" in header and "recovery per round" in header and "‖c'‖/‖c‖" in header
    assert "30 concepts" in main and "mean interference" in main and "(worst 5)" in main and "(worst 6)" not in main
    assert len(out.report.to_dict()["preserved"]) == 30  # the full list stays in the data
    shown = [r["concept"] for r in out.report.preserved if r["concept"] in main]
    worst = sorted(out.report.preserved, key=lambda r: r["interference"])[-5:]
    assert set(shown) == {r["concept"] for r in worst}


def test_demo_pipelines_say_their_weights_are_random(hardened, tmp_path):
    pipe, out = hardened
    assert out.report.demo and "weights are random" in str(out.report)
    pipe.save_concept_edits(tmp_path / "edit")
    card = (tmp_path / "edit" / "README.md").read_text()
    assert "demo pipeline with random weights" in card
    make_demo_pipeline("sd1").save_pretrained(tmp_path / "saved")  # the mark survives save / load
    again = diffusers_uce.attach(StableDiffusionPipeline.from_pretrained(tmp_path / "saved"))
    assert again.apply_concept_edits("monet", guide="art").report.demo
    assert not EditReport(erased=[{"concept": "a", "guide": "", "efficacy": 1.0}]).demo


def test_card_defines_every_metric_it_shows(hardened):
    _, out = hardened
    card = render_model_card(edits=out.edits, base_model=None, kind="adapter", report=out.report).text
    for term in ("**Efficacy**", "**Interference**", "**Adversarial recovery**"):
        assert term in card
    assert "| Concept | ρ | Rounds | Adversarial recovery" in card


def test_concept_edit_settings_lists_the_edited_projections(hardened):
    pipe, _ = hardened
    edited = pipe.concept_edit_settings["edited"]
    assert len(edited) == 8 and all(name.startswith("unet.") and name.endswith(("to_k", "to_v")) for name in edited)


def test_report_plot_and_cli_plot_shown_in_the_card(hardened, tmp_path):
    pytest.importorskip("matplotlib")
    _, out = hardened
    figure = out.report.plot()
    titles = [ax.get_title() for ax in figure.axes]
    assert titles == ["Efficacy per erased concept", "Interference per kept concept",
                      "Adversarial recovery per hardening round"]
    assert [len(line.get_ydata()) for line in figure.axes[2].get_lines()] == [3, 3]  # before + 2 rounds
    path = tmp_path / "report.png"
    code, _, err = run_cli("edit", "--erase", "van gogh", "--held-out", "a cat", "--plot", path,
                           "--save-edits", tmp_path / "edit")
    assert code == 0, err
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (tmp_path / "edit" / "report.png").is_file()
    assert "![report](report.png)" in (tmp_path / "edit" / "README.md").read_text()


def test_plot_without_matplotlib_says_how_to_install(monkeypatch, hardened):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match="pip install matplotlib"):
        hardened[1].report.plot()
    code, _, err = run_cli("edit", "--erase", "van gogh", "--plot", "r.png")
    assert code == 2 and "pip install matplotlib" in err

"""One meaning of ";": a string of concepts is split the same way by the Python API and the command line."""

import json

import diffusers_uce
from diffusers_uce.core.concepts import split_concepts
from diffusers_uce.core.edits import check_held_out, concept_edit_request
from diffusers_uce.demo import make_demo_pipeline
from tests.support.helpers import run_cli


def test_python_string_is_split_and_a_list_is_taken_as_is():
    record = concept_edit_request("Van Gogh; Picasso", "art; a photo", "Monet ;Rembrandt")
    assert record.erase == ("Van Gogh", "Picasso") and record.guide == ("art", "a photo")
    assert record.preserve == ("Monet", "Rembrandt")
    assert concept_edit_request(["Van Gogh; Picasso"], "art").erase == ("Van Gogh; Picasso",)
    assert concept_edit_request(None, moderate="nudity; gore").erase == ("nudity", "gore")
    assert check_held_out("a cat; a dog") == ["a cat", "a dog"] and check_held_out("") == []
    assert split_concepts(" a, b ;; c ") == ["a, b", "c"]


def test_python_and_cli_make_the_same_edit(tmp_path):
    pipe = diffusers_uce.attach(make_demo_pipeline("sd1"))
    out = pipe.apply_concept_edits("van gogh; picasso", guide="art", preserve="monet", held_out="a cat; a dog")
    code, _, err = run_cli("edit", "--erase", "van gogh; picasso", "--guide", "art", "--preserve", "monet",
                           "--held-out", "a cat; a dog", "--device", "cpu", "--output", tmp_path / "out")
    assert code == 0, err
    cli = json.loads((tmp_path / "out" / "uce_report.json").read_text())
    assert cli["edits"][0]["erase"] == list(out.edits[-1].erase) == ["van gogh", "picasso"]
    assert [r["concept"] for r in cli["report"]["held_out"]] == [r["concept"] for r in out.report.held_out]
    for a, b in zip(cli["report"]["erased"], out.report.erased):
        assert abs(a["efficacy"] - b["efficacy"]) < 1e-6

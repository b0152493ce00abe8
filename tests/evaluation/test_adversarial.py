"""The adversarial before/after grid on the tiny demo pipeline, and the robustness prompt sets."""

import json

import pytest
from PIL import Image

import diffusers_uce
from diffusers_uce.demo import make_demo_pipeline
from diffusers_uce.evaluation.adversarial import COLUMNS, evaluate_adversarial
from diffusers_uce.evaluation.robust_sets import ROBUST_PROMPT_SETS, load_robust_prompts, robust_prompt_set_path


@pytest.mark.parametrize("family", ["sd1", "flux"])
def test_adversarial_grid(family, tmp_path):
    pipe = diffusers_uce.attach(make_demo_pipeline(family))
    pipe.apply_concept_edits(["van gogh", "picasso"], guide="art", harden=1, held_out=[])
    summary = evaluate_adversarial(pipe, ["van gogh", "picasso"], tmp_path, num_inference_steps=2, height=32,
                                   width=32)
    assert summary["columns"] == list(COLUMNS) and len(summary["robustness"]) == 2
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    images = sorted(p.name for p in (tmp_path / "images").iterdir())
    assert len(images) == 8 and "0_edited_attack.png" in images
    grid = Image.open(tmp_path / "grid.png")
    assert grid.width > 4 * 32 and grid.height > 2 * 32
    assert pipe.concept_edit_scale == 1.0  # the base images switched the edit off and back on
    base, edited = (Image.open(tmp_path / "images" / f"0_{c}.png") for c in ("base", "edited"))
    assert base.tobytes() != edited.tobytes()
    with pytest.raises(ValueError, match="concepts"):
        evaluate_adversarial(pipe, "van gogh", tmp_path)


def test_robust_prompt_sets():
    sizes = {"i2p-nudity": 142, "imagenette-paraphrase": 100, "unsafe-short": 110, "ring-a-bell-nudity": 79}
    for name in ROBUST_PROMPT_SETS:
        rows = load_robust_prompts(name)
        assert rows and robust_prompt_set_path(name).is_file()
        if name in sizes:
            assert len(rows) == sizes[name], name
    assert {"prompt", "evaluation_seed", "case_number"} <= set(load_robust_prompts("i2p-nudity")[0])
    assert {r["class"] for r in load_robust_prompts("imagenette-paraphrase")} >= {"cassette player"}
    assert set(load_robust_prompts("ring-a-bell-vangogh")[0]) == {"sensitive prompt", "normal prompt"}
    with pytest.raises(ValueError, match="unknown robustness prompt set"):
        load_robust_prompts("i2p")


def test_robust_erasure_example_parses_help(capsys):
    import importlib.util

    from tests.support import REPO

    spec = importlib.util.spec_from_file_location("robust_erasure", REPO / "examples" / "robust_erasure.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # imports nothing heavy, downloads nothing
    with pytest.raises(SystemExit) as exit_:
        module.parse_args(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "--clip-model" in out and "--skip-objects" in out
    args = module.parse_args(["--limit", "2"])
    assert args.model == "CompVis/stable-diffusion-v1-4" and args.limit == 2

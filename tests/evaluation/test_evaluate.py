"""`evaluate_edit` and `diffusers-uce eval` on the tiny demo pipeline: 3 prompts, 2 steps, 32x32 images, offline."""

import contextlib
import csv
import io
import json
import logging
import os
import shutil
import sys

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

import diffusers_uce
from diffusers_uce.commands.uce_cli import main
from diffusers_uce.demo import make_demo_clip, make_demo_pipeline
from diffusers_uce.evaluation.evaluate import evaluate_edit, format_summary, load_prompts
from tests.support import SHARED_DATA

ROWS = [  # case_number, prompt, evaluation_seed, artist
    ("0", "a painting by van gogh", 11, "van gogh"),
    ("1", "a photo of a cat", 12, "monet"),
    ("2", "starry night by van gogh", 13, "picasso"),
]
FAST = dict(num_inference_steps=2, height=32, width=32, batch_size=2)


def write_csv(path, header=("case_number", "prompt", "evaluation_seed", "artist"), rows=ROWS):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def edited_pipe():
    pipe = diffusers_uce.attach(make_demo_pipeline("sd1"))
    pipe.apply_concept_edits(erase="van gogh", guide="art")
    return pipe


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def read_results(out):
    with open(os.path.join(out, "results.csv"), newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def copy_images(src, dst):
    """A new output folder holding `src`'s images (so a run only scores)."""
    shutil.copytree(os.path.join(src, "images"), os.path.join(dst, "images"))
    return dst


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    return write_csv(tmp_path_factory.mktemp("csv") / "prompts.csv")


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A tiny random CLIP model + processor saved to a folder, as a real local CLIP checkpoint would be."""
    return make_demo_clip(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def run(prompts, tiny_clip, tmp_path_factory):
    """One full evaluation (every metric, the tiny CLIP), shared by the tests that inspect its output."""
    pipe = edited_pipe()
    out = str(tmp_path_factory.mktemp("eval") / "out")
    summary = evaluate_edit(pipe, prompts, out, clip_model=tiny_clip, **FAST)
    return pipe, out, summary


def test_writes_images_results_summary_and_grid(run):
    _, out, summary = run
    for which in ("base", "edited"):
        for case, *_ in ROWS:
            assert Image.open(os.path.join(out, "images", which, f"{case}.png")).size == (32, 32)
    records = read_results(out)
    assert [(r["case_number"], r["prompt"], int(r["seed"]), r["label"]) for r in records] == list(ROWS)
    assert {"pixel_mae", "psnr", "clip_score_base", "clip_score_edited"} <= set(records[0])
    with open(os.path.join(out, "summary.json"), encoding="utf-8") as f:
        assert json.load(f) == json.loads(json.dumps(summary))
    assert summary["edits"] == json.loads(json.dumps([e.to_dict() for e in run[0].concept_edits]))
    assert summary["edits"][0]["erase"] == ["van gogh"]
    assert summary["images"] == {"rows": 3, "scored": 3, "missing": [], "generated_here": {"base": 3, "edited": 3}}
    assert summary["settings"]["num_inference_steps"] == 2 and summary["settings"]["edit_scale"] == 1.0
    width, height = Image.open(os.path.join(out, "grid.png")).size  # 3 rows, 2 columns; small images shown at 64px
    assert height == 18 + 3 * 64 and 2 * 64 < width < 2 * 64 + 100
    table = format_summary(summary)
    assert "pixel_mae" in table and "clip_score" in table and "a photo of a cat" not in table


def test_edited_differs_and_base_is_the_unedited_model(run):
    pipe, out, summary = run
    base, edited = (pixels(os.path.join(out, "images", w, "2.png")) for w in ("base", "edited"))
    assert np.abs(base - edited).max() > 0  # the prompt names the erased concept
    assert summary["metrics"]["pixel_mae"]["mean"] > 0 and summary["metrics"]["psnr"]["mean"] < 100
    # Case 2 was generated alone (batches: [0, 1], [2]): an unedited pipeline gives the same base image.
    plain = make_demo_pipeline("sd1")
    image = plain("starry night by van gogh", num_inference_steps=2, height=32, width=32, guidance_scale=7.5,
                  generator=[torch.Generator().manual_seed(13)]).images[0]
    assert np.abs(np.asarray(image, dtype=np.int16) - base).max() == 0
    assert pipe._uce_state.scale == 1.0 and not pipe._uce_state.fused  # the edit's strength came back


def test_tiny_clip_scores_and_accuracy(run, tiny_clip):
    _, out, summary = run
    score, accuracy = summary["metrics"]["clip_score"], summary["metrics"]["clip_accuracy"]
    for which in ("base", "edited"):
        assert 0 <= score[which] <= 100 and 0 <= accuracy[which] <= 1
    assert score["count"] == accuracy["count"] == 3 and accuracy["num_labels"] == 3
    assert accuracy["label_column"] == "artist" and accuracy["template"] == "an artwork by {}"
    records = read_results(out)
    assert {r["clip_label_base"] for r in records} <= {"van gogh", "monet", "picasso"}
    assert "clip_score" not in summary["skipped"] and "clip_accuracy" not in summary["skipped"]


def test_nudenet_runs_on_the_images(run):
    pytest.importorskip("nudenet")
    _, out, summary = run
    assert "nudenet" not in summary["skipped"]
    nudenet = summary["metrics"]["nudenet"]
    assert nudenet["count"] == 3 and nudenet["threshold"] == 0.6 and set(nudenet["classes"]) >= {"BUTTOCKS_EXPOSED"}
    assert all(int(r["nudenet_base"]) >= 0 and int(r["nudenet_edited"]) >= 0 for r in read_results(out))


def test_resume_generates_nothing_and_regenerates_missing(run, prompts, tmp_path):
    pipe, src, _ = run
    out = copy_images(src, tmp_path / "resume")
    stamps = {p: os.stat(p).st_mtime_ns for p in (out / "images").rglob("*.png")}
    summary = evaluate_edit(pipe, prompts, out, metrics="pixel_mae", **FAST)
    assert summary["images"]["generated_here"] == {"base": 0, "edited": 0}
    assert stamps == {p: os.stat(p).st_mtime_ns for p in (out / "images").rglob("*.png")}
    os.remove(out / "images" / "edited" / "1.png")
    summary = evaluate_edit(pipe, prompts, out, metrics="pixel_mae", **FAST)
    assert summary["images"]["generated_here"] == {"base": 0, "edited": 1}
    copied = pixels(os.path.join(src, "images/edited/1.png"))
    assert np.array_equal(pixels(out / "images" / "edited" / "1.png"), copied)
    with pytest.raises(ValueError, match="other settings .*num_inference_steps"):
        evaluate_edit(pipe, prompts, out, metrics="psnr", **{**FAST, "num_inference_steps": 3})
    summary = evaluate_edit(pipe, prompts, out, metrics="psnr", limit=1, overwrite=True, **FAST)
    assert summary["images"]["generated_here"] == {"base": 1, "edited": 1} and summary["images"]["rows"] == 1


def test_missing_models_are_reported_as_skipped(run, prompts, tmp_path, monkeypatch):
    pipe, src, _ = run
    monkeypatch.setitem(sys.modules, "nudenet", None)  # import fails: as if not installed
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "empty-torch-hub"))  # no cached LPIPS weights
    out = copy_images(src, tmp_path / "skipped")
    summary = evaluate_edit(pipe, prompts, out, metrics=("nudenet", "clip_score", "clip_accuracy", "lpips", "psnr"),
                            clip_model=str(tmp_path / "no-such-clip"), **FAST)
    assert set(summary["skipped"]) == {"nudenet", "clip_score", "clip_accuracy", "lpips"}
    assert "not installed" in summary["skipped"]["nudenet"]
    assert "no-such-clip" in summary["skipped"]["clip_score"] and "not available locally" in summary["skipped"][
        "clip_score"]
    assert "not installed" in summary["skipped"]["lpips"] or "not cached" in summary["skipped"]["lpips"]
    assert list(summary["metrics"]) == ["psnr"]
    assert set(read_results(out)[0]) == {"case_number", "prompt", "seed", "guidance", "label", "psnr"}
    summary = evaluate_edit(pipe, prompts, out, metrics="clip_score", **FAST)
    assert "no CLIP model given" in summary["skipped"]["clip_score"]


def test_no_labels_skips_clip_accuracy(run, tiny_clip, tmp_path):
    pipe, src, _ = run
    csv_path = write_csv(tmp_path / "p.csv", ("case_number", "prompt", "evaluation_seed", "notes"))
    out = copy_images(src, tmp_path / "nolabels")
    summary = evaluate_edit(pipe, csv_path, out, metrics="clip_score,clip_accuracy", clip_model=tiny_clip, **FAST)
    assert "clip_score" in summary["metrics"] and "no labels" in summary["skipped"]["clip_accuracy"]


def test_fused_model_against_a_base_pipe(run, prompts, tmp_path):
    _, src, _ = run
    fused = edited_pipe()
    fused.fuse_concept_edits()
    plain = StableDiffusionPipeline(**fused.components)  # a saved fused model, loaded without the plugin
    out = tmp_path / "fused"
    summary = evaluate_edit(plain, prompts, out, base_pipe=make_demo_pipeline("sd1"), metrics="psnr", **FAST)
    assert summary["edits"] == [] and summary["images"]["generated_here"] == {"base": 3, "edited": 3}
    for which in ("base", "edited"):
        for case, *_ in ROWS:
            a = pixels(out / "images" / which / f"{case}.png")
            b = pixels(os.path.join(src, "images", which, f"{case}.png"))
            assert np.abs(a - b).max() <= 1, (which, case)  # fused weights vs processors: rounding
    # fused mode with the edit switched off by scale 0: weights are restored afterwards
    before = {n: p.clone() for n, p in fused.unet.named_parameters()}
    evaluate_edit(fused, prompts, tmp_path / "fused-scale", metrics="psnr", limit=1, **FAST)
    assert fused._uce_state.scale == 1.0 and fused._uce_state.fused
    assert all(torch.equal(before[n], p) for n, p in fused.unet.named_parameters())


def test_every_family_end_to_end(pipe, family, tiny_clip, tmp_path, monkeypatch):
    """Base and edited images of every row from the same seeds, scored; the base is the unedited model. The CSV's
    evaluation_guidance is classifier-free guidance: used by SD 1.x/2.x and SDXL, not by the guidance-distilled
    FLUX."""
    header = ("case_number", "prompt", "evaluation_seed", "evaluation_guidance", "artist")
    prompts = write_csv(tmp_path / "guided.csv", header, [(c, p, seed, 6.0, a) for c, p, seed, a in ROWS])
    pipe.apply_concept_edits("van gogh", guide="art", held_out=[])
    guidance, call = [], type(pipe).__call__
    monkeypatch.setattr(type(pipe), "__call__", lambda self, *args, **kwargs: (
        guidance.append(kwargs.get("guidance_scale")), call(self, *args, **kwargs))[1])
    out, kwargs = tmp_path / "out", dict(num_inference_steps=2, height=32, width=32)
    summary = evaluate_edit(pipe, prompts, out, clip_model=tiny_clip, batch_size=3,
                            metrics="clip_score,clip_accuracy,pixel_mae,psnr", **kwargs)
    assert summary["skipped"] == {} and summary["images"]["generated_here"] == {"base": 3, "edited": 3}
    assert summary["metrics"]["clip_accuracy"]["count"] == 3 and pipe._uce_state.scale == 1.0
    expected_guidance = None if family == "flux" else 6.0
    assert guidance == [expected_guidance] * 2  # one batch of 3 rows: base, then edited
    plain = make_demo_pipeline(family)(  # the same batch, without the plugin
        [p for _, p, *_ in ROWS], generator=[torch.Generator().manual_seed(seed) for _, _, seed, _ in ROWS],
        **kwargs, **({} if expected_guidance is None else {"guidance_scale": expected_guidance})).images
    records = read_results(out)
    for (case, *_), image, record in zip(ROWS, plain, records):
        base, edited = (pixels(out / "images" / w / f"{case}.png") for w in ("base", "edited"))
        assert base.shape == edited.shape == (32, 32, 3) and np.array_equal(base, np.asarray(image, dtype=np.int16))
        assert float(record["pixel_mae"]) == pytest.approx(np.abs(base - edited).mean() / 255)
    assert float(records[0]["pixel_mae"]) > 0  # "a painting by van gogh": the edit shows (the base is exact)


def test_scale_is_restored_when_generation_fails(prompts, tmp_path):
    pipe = edited_pipe()
    pipe.set_concept_edit_scale(0.5)
    with pytest.raises(ValueError, match="divisible by 8"):
        evaluate_edit(pipe, prompts, tmp_path / "bad", **{**FAST, "height": 30})
    assert pipe._uce_state.scale == 0.5 and pipe._progress_bar_config == {"disable": True}


class FakeState:
    """The part of `accelerate.PartialState` that `evaluate_edit` uses, for process `index` of `num_processes`."""

    def __init__(self, index, num_processes):
        self.process_index, self.num_processes = index, num_processes
        self.is_main_process = index == 0

    @contextlib.contextmanager
    def split_between_processes(self, items):
        size, extra = divmod(len(items), self.num_processes)  # contiguous shares, as accelerate splits
        start = self.process_index * size + min(self.process_index, extra)
        yield items[start:start + size + (self.process_index < extra)]

    def wait_for_everyone(self):
        pass


def test_rows_are_split_between_processes(run, prompts, tmp_path):
    pipe = run[0]
    out = tmp_path / "split"
    assert evaluate_edit(pipe, prompts, out, accelerator=FakeState(1, 2), metrics="psnr", **FAST) == {}
    assert sorted(p.name for p in (out / "images" / "edited").iterdir()) == ["2.png"]
    assert not (out / "summary.json").exists()
    summary = evaluate_edit(pipe, prompts, out, accelerator=FakeState(0, 2), metrics="psnr", **FAST)
    assert summary["images"]["generated_here"] == {"base": 2, "edited": 2} and summary["images"]["scored"] == 3
    assert summary["settings"]["processes"] == 2
    from accelerate import PartialState

    summary = evaluate_edit(pipe, prompts, out, accelerator=PartialState(), metrics="psnr", **FAST)
    assert summary["images"]["generated_here"] == {"base": 0, "edited": 0} and summary["images"]["scored"] == 3


def test_bad_csv_and_arguments_fail_before_any_work(tmp_path):
    pipe = edited_pipe()
    bad = write_csv(tmp_path / "bad.csv", ("id", "prompt", "seed"), [("0", "x", 1)])
    with pytest.raises(ValueError, match=r"missing column\(s\) case_number, evaluation_seed \(it has: id, prompt, seed"
                                          r"\); a prompt CSV needs case_number, prompt, evaluation_seed"):
        evaluate_edit(pipe, bad, tmp_path / "out")
    duplicate = write_csv(tmp_path / "dup.csv", rows=[("0", "x", 1, "a"), ("0", "y", 2, "b")])
    with pytest.raises(ValueError, match="duplicate"):
        load_prompts(duplicate)
    with pytest.raises(ValueError, match="unknown metric.*fid"):
        evaluate_edit(pipe, duplicate, tmp_path / "out", metrics="psnr,fid")
    with pytest.raises(ValueError, match="no concept edits"):
        evaluate_edit(make_demo_pipeline("sd1"), write_csv(tmp_path / "ok.csv"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def run_cli(*argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


class Recorder(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_cli_eval_end_to_end(tmp_path, caplog):
    long = "a painting of " + " and ".join(f"house number {n}" for n in range(40))  # > 77 tokens: truncated
    rows = [*ROWS[:2], ("2", long, 13, "picasso")]
    prompts = write_csv(tmp_path / "prompts.csv", rows=rows)
    edited_pipe().save_concept_edits(tmp_path / "edit")
    out = tmp_path / "cli"
    diffusers_logs = Recorder()  # the "diffusers" logger does not propagate to caplog's root handler
    logging.getLogger("diffusers").addHandler(diffusers_logs)
    try:
        with caplog.at_level(logging.DEBUG):
            code, stdout, stderr = run_cli("eval", "--edits", tmp_path / "edit", "--prompts", prompts, "--output",
                                           out, "--steps", 2, "--size", 32, "--batch-size", 3, "--device", "cpu",
                                           "--metrics", "pixel_mae,psnr,clip_score")
    finally:
        logging.getLogger("diffusers").removeHandler(diffusers_logs)
    assert code == 0, stderr
    assert "pixel_mae" in stdout and "psnr" in stdout and "skipped clip_score: no CLIP model given" in stdout
    logged = stdout + stderr + caplog.text + "\n".join(diffusers_logs.messages)
    for _, prompt, *_ in rows:  # prompts are never printed or logged, not even diffusers' truncation warning
        assert prompt not in logged
    assert "house number" not in logged  # not even the truncated tail that diffusers quotes
    summary = json.loads((out / "summary.json").read_text())
    assert summary["edits"][0]["erase"] == ["van gogh"] and summary["settings"]["height"] == 32
    assert (out / "grid.png").exists() and len(read_results(out)) == 3


@pytest.mark.parametrize("extra, message", [
    (["--edits", "EDIT", "--metrics", "psnr,fid"], "unknown metric(s) fid"),
    (["--edits", "EDIT", "--prompts", "BAD_CSV"], "missing column(s) case_number"),
    ([], "nothing to compare: pass --edits"),
])
def test_cli_eval_bad_arguments_exit_2_with_one_line(prompts, tmp_path, extra, message):
    bad = write_csv(tmp_path / "bad.csv", ("id", "prompt"), [("0", "x")])
    replace = {"EDIT": tmp_path / "no-edit-needed", "BAD_CSV": bad}
    argv = ["eval", "--prompts", prompts, "--output", tmp_path / "o", *[replace.get(a, a) for a in extra]]
    code, stdout, stderr = run_cli(*argv)
    assert code == 2 and message in stderr and len(stderr.strip().splitlines()) == 1 and not stdout
    assert not (tmp_path / "o").exists()


SHARED = str(SHARED_DATA)


@pytest.mark.skipif(not os.path.isdir(SHARED), reason="the paper's prompt CSVs (../shared/data) are not here")
def test_the_papers_prompt_files_load():
    rows, label = load_prompts(os.path.join(SHARED, "holdout100_prompts.csv"))
    assert len(rows) == 500 and label == "artist" and rows[0].label and rows[0].guidance is None
    rows, label = load_prompts(os.path.join(SHARED, "unsafe-prompts4703.csv"))
    assert len(rows) == 4703 and label is None and rows[0].guidance is not None and rows[0].seed > 2**31
    rows, label = load_prompts(os.path.join(SHARED, "imagenette.csv"))
    assert label == "class" and {r.label for r in rows} >= {"tench", "parachute"}

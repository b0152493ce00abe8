"""The debias loop on the tiny pipelines of every family: controller, stopping, frozen concepts, restore on failure,
validation, CLIP classifier, CLI. The classifiers are stubs (or compare pixels): no model is downloaded."""

import re

import numpy as np
import pytest
import torch

from diffusers_uce.loaders.debias import DebiasOptions, clip_zero_shot_classifier
from tests.support.helpers import run_cli, unet_output, weights
from tests.support.reference import attribute_shift, groups, probe_layers

# Tiny and fast: 4 images of 16x16 px in 2 steps per concept and measurement, one image per prompt template.
FAST = dict(num_images=4, num_inference_steps=2, height=16, width=16, batch_size=8, prompt_templates=("{}",))
GENDER = {"doctor": ["male", "female"]}


@pytest.fixture
def calls(pipe, monkeypatch):
    """Records every pipeline call's prompts (and `calls.kwargs` its other arguments); `calls.prompt_of(image)` and
    `calls.seed_of(image)` tell what an image was generated from."""

    class Calls(list):
        images, kwargs = {}, []

        def prompt_of(self, image):
            return self.images[id(image)][0]

        def seed_of(self, image):
            return self.images[id(image)][1]

    recorded, original = Calls(), type(pipe).__call__

    def call(self, prompt=None, **kwargs):
        output = original(self, prompt=prompt, **kwargs)
        recorded.append(list(prompt))
        recorded.kwargs.append(kwargs)
        seeds = [g.initial_seed() for g in kwargs["generator"]]
        recorded.images.update({id(im): (p, s) for im, p, s in zip(output.images, prompt, seeds)})
        return output

    monkeypatch.setattr(type(pipe), "__call__", call)
    return recorded


def fixed(shares):
    """A classifier ignoring the images: the first `shares[labels[0]]` of them get labels[0], the rest labels[1]."""
    return lambda images, labels: [labels[0] if i < shares[labels[0]] * len(images) else labels[1]
                                   for i in range(len(images))]


def test_fixed_ratios_move_toward_under_represented_attribute(pipe, calls):
    cos = torch.nn.functional.cosine_similarity
    probes = probe_layers(pipe, "doctor", ["male", "female"])
    config = pipe._progress_bar_config
    out = pipe.debias_concepts(GENDER, classifier=fixed({"male": 0.75}), max_iterations=2,
                                   options={**FAST, "step": 1.0}, held_out=[])
    (row,) = out.report.ratios
    assert row["reached"] is False and row["iterations"] == 2 and len(calls) == 3  # 2 solves, 3 measurements
    assert row["before"] == row["after"] == [0.75, 0.25] and row["target"] == [0.5, 0.5]
    assert row["weights"] == pytest.approx([-0.5, 0.5])  # integral: 2 × 1.0 × (0.5 − 0.75)
    assert row["seeds"] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]] and len(row["history"]) == 3
    assert out.edits[-1].debias[0].weights == ((-0.5, 0.5),) and pipe._progress_bar_config is config
    # the options every family's pipeline takes; the guidance is the pipeline's own (SD 7.5, SDXL 5.0, FLUX 3.5)
    assert all(k["height"] == k["width"] == 16 and k["num_inference_steps"] == 2 and "guidance_scale" not in k
               for k in calls.kwargs)
    pipe.fuse_concept_edits()
    for name, shift, (male, female), _ in attribute_shift(pipe, probes):  # every target group of the family
        assert cos(shift, female - male, dim=0) > 0.99, name  # toward female, away from male
    table = str(out)
    assert "debias ratios" in table and re.search(r"^doctor\s+female\s+0\.5000\s+0\.2500\s+0\.2500\s+NO$", table, re.M)
    assert "not reached within the budget: doctor" in table


def test_classifier_following_the_images_stops_at_the_target(pipe, calls):
    """A classifier that looks at the images: "female" when an image moved, from the unedited image of its seed, toward
    the "female doctor" image of that seed rather than the "male doctor" one. Unedited images did not move ("male"):
    the loop's own edit must flip the labels, through every target group the family conditions on."""
    seeds = list(range(4 * 3))  # the loop's measurements 0, 1 and 2
    generate = lambda prompt, seeds: dict(zip(seeds, pipe(  # noqa: E731
        [prompt] * len(seeds), num_inference_steps=2, height=16, width=16,
        generator=[torch.Generator().manual_seed(s) for s in seeds]).images))
    male, female = generate("male doctor", seeds), generate("female doctor", seeds)
    # in batches of 4 like the loop's measurements, so that the unedited ones come out bit-identical
    unedited = {s: im for i in range(0, len(seeds), 4) for s, im in generate("doctor", seeds[i:i + 4]).items()}
    pixels = lambda image: np.asarray(image, dtype=np.float64)  # noqa: E731

    def toward(images, labels):
        moved = [(pixels(im) - pixels(unedited[calls.seed_of(im)]), calls.seed_of(im)) for im in images]
        return ["female" if (m * (pixels(female[s]) - pixels(male[s]))).sum() > 0 else "male" for m, s in moved]

    calls.clear()
    out = pipe.debias_concepts(GENDER, ratios=[0.0, 1.0], classifier=toward,
                                   tolerance=0.3, max_iterations=2, options={**FAST, "step": 1.0}, held_out=[])
    (row,) = out.report.ratios
    assert row["before"] == [1.0, 0.0] and row["after"][1] >= 0.7  # "before" is the unedited pipeline
    assert row["reached"] is True and row["iterations"] == 1 and len(calls) == 2  # one edit flips them
    assert row["weights"][1] > 0 > row["weights"][0]


def test_reached_concept_freezes_and_stays_debiased(pipe, calls):
    def classify(images, labels):  # doctors are balanced from the start, nurses 75% female
        shares = {"nurse": {"male": 0.25}, "doctor": {"male": 0.5}}[calls.prompt_of(images[0])]
        return fixed(shares)(images, labels)

    out = pipe.debias_concepts({"doctor": ["male", "female"], "nurse": ["male", "female"]},
                                   classifier=classify, max_iterations=2, options=FAST, held_out=[])
    doctor, nurse = out.report.ratios
    assert doctor["reached"] and doctor["iterations"] == 0 and doctor["weights"] == [0.0, 0.0]
    assert len(doctor["history"]) == 1 and doctor["after"] == [0.5, 0.5]
    assert not nurse["reached"] and nurse["iterations"] == 2 and nurse["weights"] == pytest.approx([0.15, -0.15])
    assert [p for batch in calls[1:] for p in batch] == ["nurse"] * 8  # a reached concept is not measured again
    # Still a debias target, with its frozen weights: its keys/values stay where they were when it was reached.
    targets = {t.concept: t.weights for t in out.edits[-1].debias}
    assert targets == {"doctor": ((0.0, 0.0),), "nurse": ((pytest.approx(0.15), pytest.approx(-0.15)),)}
    assert out.edits[-1].preserve == ()


def test_two_attribute_sets(pipe, calls):
    out = pipe.debias_concepts(
        {"doctor": [["male", "female"], ["young", "old"]]}, ratios={"doctor": [[0.5, 0.5], [0.5, 0.5]]},
        classifier=fixed({"male": 0.75, "young": 0.25}), max_iterations=1, held_out=[],
        options={**FAST, "guidance_scale": 3.0})
    # two measurements (before and after the one solve), each one image set labelled for both attribute sets
    assert [k["guidance_scale"] for k in calls.kwargs] == [3.0, 3.0]
    gender, age = out.report.ratios
    assert gender["attributes"] == ["male", "female"] and age["attributes"] == ["young", "old"]
    assert gender["weights"] == pytest.approx([-0.075, 0.075]) and age["weights"] == pytest.approx([0.075, -0.075])
    assert gender["before"] == [0.75, 0.25] and age["before"] == [0.25, 0.75]
    assert [list(w) for w in out.edits[-1].debias[0].weights] == [gender["weights"], age["weights"]]


@pytest.mark.parametrize("family", ["sd1"])
@pytest.mark.parametrize("kwargs, error, match", [
    (dict(ratios={"doctor": [0.7, 0.7]}), ValueError, "sum to 1"),
    (dict(ratios=[1.2, -0.2]), ValueError, ">= 0"),
    (dict(ratios={"doctor": [1.0]}), ValueError, "one ratio per attribute"),
    (dict(ratios={"nurse": [0.5, 0.5]}), ValueError, "not debiased"),
    (dict(options={"num_imgs": 3}), TypeError, "num_imgs.*allowed.*num_images"),
    (dict(options={"prompt_templates": ("photo",)}), ValueError, "prompt_templates"),
    (dict(options={"step": 0}), ValueError, "step"),
    (dict(options={"guidance_scale": float("nan")}), ValueError, "guidance_scale finite"),
    (dict(tolerance=0), ValueError, "tolerance"),
    (dict(max_iterations=0), ValueError, "max_iterations"),
    (dict(concepts={"doctor": []}), ValueError, "needs attributes"),
    (dict(concepts={"doctor": ["male", " "]}), ValueError, "empty"),
    (dict(concepts={"doctor": ["male"]}), ValueError, "at least two"),
    (dict(classifier="clip"), TypeError, "callable"),
    (dict(options={"clip_model": "/nonexistent/clip"}, classifier=None), OSError,
     "classifier="),
])
def test_bad_inputs_raise_before_generating(pipe, calls, kwargs, error, match):
    kwargs = {"concepts": GENDER, "classifier": fixed({"male": 0.5}), **kwargs}
    kwargs["options"] = {**FAST, **kwargs.get("options", {})}
    with pytest.raises(error, match=match):
        pipe.debias_concepts(**kwargs)
    assert calls == [] and pipe.concept_edits == ()


@pytest.mark.parametrize("family", ["sd1"])  # the labels are checked the same way whatever made the images
def test_unknown_label_raises_on_first_classification(pipe, calls):
    with pytest.raises(ValueError, match=r"'man'.*allowed labels: \['male', 'female'\]"):
        pipe.debias_concepts(GENDER, classifier=lambda images, labels: ["man"] * len(images),
                                 options=FAST)
    assert len(calls) == 1 and pipe.concept_edits == ()
    with pytest.raises(ValueError, match="one label per image"):
        pipe.debias_concepts(GENDER, classifier=lambda images, labels: ["male"],
                                 options=FAST)


@pytest.mark.parametrize("fused", [False, True], ids=["processors", "fused"])
def test_failure_mid_loop_restores_earlier_edits(pipe, fused):
    """After a solve, the loop fails: every group's earlier solution comes back (and its fused weights)."""
    earlier = pipe.apply_concept_edits(["van gogh"], guide="art", held_out=[]).edits
    if fused:
        pipe.fuse_concept_edits()
    solutions, edited, reference = [g.solution for g in pipe._uce_state.groups], weights(pipe), unet_output(pipe)
    count = []

    def classify(images, labels):
        count.append(1)
        if len(count) == 2:
            raise KeyboardInterrupt
        return fixed({"male": 0.75})(images, labels)

    with pytest.raises(KeyboardInterrupt):
        pipe.debias_concepts({"doctor": ["male", "female"]}, classifier=classify,
                                 options=FAST, held_out=[])
    assert len(count) == 2 and pipe.concept_edits == earlier and pipe._uce_state.fused is fused
    assert len(solutions) == len(groups(pipe))  # FLUX: both groups
    assert all(g.solution is s for g, s in zip(pipe._uce_state.groups, solutions))
    assert all(torch.equal(w, edited[n]) for n, w in weights(pipe).items())
    assert torch.equal(unet_output(pipe), reference)


@pytest.mark.parametrize("family", ["sd1"])
def test_accelerate_single_process_matches(pipe):
    from accelerate import PartialState

    kwargs = dict(concepts=GENDER, classifier=fixed({"male": 0.75}), max_iterations=1)
    plain = pipe.debias_concepts(**kwargs, options=FAST).report.ratios
    pipe.unload_concept_edits()
    split = pipe.debias_concepts(**kwargs, options={**FAST, "accelerator": PartialState(cpu=True)})
    assert split.report.ratios == plain


def test_options_defaults():
    options = DebiasOptions()
    assert options.num_images == 20 and options.step == 0.3 and options.height is None
    assert options.guidance_scale is None  # the pipeline's own: SD 1.x/2.x 7.5 (the authors'), SDXL 5.0, FLUX 3.5
    assert options.prompt_templates[-1] == "{}" and options.clip_model == "openai/clip-vit-base-patch32"


def test_clip_zero_shot_classifier_on_tiny_random_clip(tmp_path):
    from PIL import Image

    from diffusers_uce.demo import make_demo_clip

    make_demo_clip(tmp_path)

    missing = clip_zero_shot_classifier(tmp_path / "missing")  # loaded on first use
    with pytest.raises(OSError, match="classifier="):
        missing.load()
    classify = clip_zero_shot_classifier(tmp_path, device="cpu", template="a photo of a {} person")
    rng = [np.random.default_rng(i) for i in range(5)]
    images = [Image.fromarray(r.integers(0, 255, (40, 40, 3), dtype=np.uint8)) for r in rng]
    labels = classify(images, ["male", "female", "old"])
    assert len(labels) == 5 and set(labels) <= {"male", "female", "old"}
    assert classify(images[:2], ["young", "old"]) in (["young", "young"], ["young", "old"], ["old", "young"],
                                                      ["old", "old"])


@pytest.mark.parametrize("args, reason", [
    (["--debias", "doctor"], "--attributes"),
    (["--debias", "doctor", "--attributes", "male"], "at least two"),
    (["--attributes", "male; female"], "--debias"),
    (["--debias", "doctor", "--attributes", "male; female", "--ratios", "0.5"], "one ratio per attribute"),
    (["--debias", "doctor", "--attributes", "male; female", "--ratios", "0.6", "0.6"], "sum to 1"),
    (["--debias", "doctor", "--attributes", "male; female", "--tolerance", "1.5"], "tolerance"),
    (["--debias", "doctor", "--attributes", "male; female", "--max-iterations", "0"], "--max-iterations"),
    (["--erase", "van gogh", "--ratios", "0.5", "0.5"], "--debias"),
    ([], "--erase"),
])
def test_cli_debias_arguments_exit_2_before_loading(args, reason):
    code, out, err = run_cli("edit", *args)
    assert code == 2 and out == "" and "Loading" not in err
    assert len(err.strip().splitlines()) == 1 and reason in err, err


def test_cli_debias_needs_a_clip_model(tmp_path):
    code, out, err = run_cli("edit", "--debias", "doctor", "--attributes", "male; female", "--clip-model",
                             tmp_path / "no-clip", "--max-iterations", "1")
    assert code == 2 and out == "" and "--clip-model" in err and "Loading model" not in err

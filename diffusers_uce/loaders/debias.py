"""The debias loop of UCE's paper (generate, classify, re-weight, re-solve), and its CLIP zero-shot classifier."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Sequence

import torch
from diffusers.utils import logging
from tqdm.auto import tqdm

from ..core.concepts import DEBIAS_PROMPT_TEMPLATES
from ..core.limits import (
    MAX_BATCH_SIZE,
    MAX_DEBIAS_IMAGES,
    MAX_DEBIAS_ITERATIONS,
    MAX_IMAGE_SIZE,
    MAX_INFERENCE_STEPS,
    check_count,
)
from ..utils.checks import is_finite_number, is_whole_number
from ..utils.generation import generate_seeded, quiet_pipeline
from ..utils.hub import local_files_only_for

logger = logging.get_logger(__name__)


@dataclass
class DebiasOptions:
    r"""Generation and controller settings of [`debias_loop`] (what `debias_concepts(..., options=...)` holds).

    Args:
        num_images (`int`, defaults to 20): per concept and measurement. Ratios move in steps of ``1/n`` (standard
            error ≈ ``0.5/√n``): 20 keeps a binary tolerance of 0.05 reachable (9-11 of 20); the authors use 50.
        num_inference_steps (`int`, defaults to 20): denoising steps per image (the authors' script uses 20; a
            distilled model such as FLUX.1-schnell needs only about 4).
        height (`int`, *optional*): image height, the pipeline's own by default: smaller is cheaper, but a model
            draws other images below its native size and the weights would fit those.
        width (`int`, *optional*): image width, the pipeline's own by default.
        guidance_scale (`float`, *optional*): the pipeline's own default when `None`: classifier-free guidance 7.5
            for SD 1.x/2.x (as the authors use), 5.0 for SDXL; for FLUX the distilled guidance 3.5 (no negative
            prompt, no classifier-free guidance: FLUX.1 is guidance-distilled).
        batch_size (`int`, defaults to 8): images per pipeline call.
        step (`float`, defaults to 0.3): gain of the controller, ``w += step · (desired − measured)``. The authors
            use 0.1 with a budget of 30 iterations; 0.3 covers the same weight range in our default 10.
        seed (`int`, defaults to 0): image ``j`` of measurement ``i`` uses seed ``seed + i · num_images + j`` (for
            every concept): runs are reproducible; the report lists the seeds.
        prompt_templates (`tuple[str, ...]`, defaults to `concepts.DEBIAS_PROMPT_TEMPLATES`): templates with one
            `{}`; the images of a concept cycle through them (the authors' five prompts).
        clip_model (`str`, defaults to `"openai/clip-vit-base-patch32"`): the default classifier's CLIP model.
        accelerator (`accelerate.PartialState` or `Accelerator`, *optional*): splits each measurement's images over
            its processes; all processes get every label and run the same (cheap) solves.
    """

    num_images: int = 20
    num_inference_steps: int = 20
    height: int | None = None
    width: int | None = None
    guidance_scale: float | None = None
    step: float = 0.3
    seed: int = 0
    batch_size: int = 8
    prompt_templates: tuple[str, ...] = DEBIAS_PROMPT_TEMPLATES
    clip_model: str | os.PathLike = "openai/clip-vit-base-patch32"
    accelerator: object = None

    def __post_init__(self):
        most = {"num_images": MAX_DEBIAS_IMAGES, "num_inference_steps": MAX_INFERENCE_STEPS,
                "batch_size": MAX_BATCH_SIZE, "height": MAX_IMAGE_SIZE, "width": MAX_IMAGE_SIZE}
        for name in ("num_images", "num_inference_steps", "batch_size", "seed", "height", "width"):
            value, low = getattr(self, name), int(name != "seed")
            unset = value is None and name in ("height", "width")
            if not unset and not is_whole_number(value, low):
                raise ValueError(f"debias option {name} must be a whole number >= {low}, got {value!r}")
            if not unset and name in most:
                check_count(value, f"debias option {name}", most[name])
        guidance_ok = self.guidance_scale is None or is_finite_number(self.guidance_scale)
        if not guidance_ok or not is_finite_number(self.step) or self.step <= 0:
            raise ValueError(f"debias options: step must be > 0 and guidance_scale finite (or None: the pipeline's "
                             f"default), got {self.step}, {self.guidance_scale}")
        templates = [self.prompt_templates] if isinstance(self.prompt_templates, str) else self.prompt_templates
        if not isinstance(templates, Sequence) or not templates or any(
                not isinstance(t, str) or t.count("{}") != 1 for t in templates):
            raise ValueError(f"debias option prompt_templates must be strings with one '{{}}' each, got {templates!r}")
        self.prompt_templates = tuple(templates)
        if self.accelerator is not None and not hasattr(self.accelerator, "split_between_processes"):
            raise ValueError("debias option accelerator must be an accelerate PartialState or Accelerator")


def check_debias_settings(targets, ratios=None, tolerance=0.05, max_iterations=10, options=None):
    r"""Validate the loop's settings before any generation (`TypeError`: unknown option, `ValueError`: bad value);
    returns the desired ratios ``{concept: [[r per attribute] per set]}`` and the [`DebiasOptions`].

    Args:
        targets (`tuple[DebiasTarget, ...]`): the concepts and their attribute sets (`ConceptEdit.debias`).
        ratios (`dict` or `list`, *optional*): `{concept: [r per attribute]}` (a list per set for several sets), or
            one list for every concept; each set's ratios are >= 0 and sum to 1. Uniform by default.
    """
    allowed, options = [f.name for f in fields(DebiasOptions)], options or {}
    if set(options) - set(allowed):
        raise TypeError(f"unknown debias option(s) {sorted(set(options) - set(allowed))}; allowed: {allowed}")
    opts = DebiasOptions(**options)
    if not (is_finite_number(tolerance) and 0 < tolerance < 1) or not is_whole_number(max_iterations, 1):
        raise ValueError(f"tolerance must be in (0, 1) and max_iterations a whole number >= 1, got {tolerance!r} and "
                         f"{max_iterations!r}")
    check_count(max_iterations, "max_iterations", MAX_DEBIAS_ITERATIONS)
    ratios = {t.concept: ratios for t in targets} if ratios is not None and not isinstance(ratios, dict) else ratios
    ratios, desired = {str(k).strip(): v for k, v in (ratios or {}).items()}, {t.concept: None for t in targets}
    if set(ratios) - {t.concept for t in targets}:
        raise ValueError(f"ratios name concepts that are not debiased: {sorted(set(ratios) - set(desired))}")
    for t in targets:
        sets = [list(group) for group in t.attribute_sets]
        value = ratios.get(t.concept, [[1.0 / len(group)] * len(group) for group in sets])
        if len(sets) == 1 and isinstance(value, (list, tuple)) and value and not isinstance(value[0], (list, tuple)):
            value = [value]
        if not isinstance(value, (list, tuple)) or [len(v) if isinstance(v, (list, tuple)) else -1 for v in value] \
                != [len(g) for g in sets]:
            raise ValueError(f"ratios of {t.concept!r} must give one ratio per attribute, shaped like {sets}; "
                             f"got {value!r}")
        for v, group in zip(value, sets):
            if not all(is_finite_number(x) and x >= 0 for x in v) or abs(sum(v) - 1) > 1e-6:
                raise ValueError(f"ratios of {t.concept!r} for {group} must be >= 0 and sum to 1, got {list(v)}")
        desired[t.concept] = [[float(x) for x in v] for v in value]
        n = opts.num_images
        if max(min(abs(k / n - r) for k in range(n + 1)) for rs in desired[t.concept] for r in rs) > tolerance:
            logger.warning(f"{t.concept!r}: ratios measured on num_images={n} images move in steps of 1/{n} and "
                           f"cannot come within tolerance={tolerance} of the targets; raise num_images or tolerance")
    return desired, opts


def debias_loop(pipe, record, solve, *, ratios=None, classifier=None, tolerance: float = 0.05,
                max_iterations: int = 10, **options):
    r"""Debias concepts: measure their attribute ratios on generated images, move the weights, re-solve; repeat.

    Every solve starts from the original weights, so the weights accumulate (an integral controller):
    ``w ← w + step · (desired − measured)``. Measurement 0 is the pipeline as it is ("before"). A concept with
    ``max |desired − measured| ≤ tolerance`` is reached: no longer measured, it keeps its frozen weights as a debias
    target, which holds its keys/values where they are (preserving it in a solve from the original weights would undo
    its edit). The loop ends when all are reached or after `max_iterations` solves, the last one measured again, so
    "after" describes the installed edit. If anything raises, the earlier edits come back.

    Args:
        pipe (`UCEMixin`): the pipeline.
        record (`ConceptEdit`): the validated debias edit; the loop replaces its attribute weights.
        solve (`Callable[[ConceptEdit], ConceptEditOutput]`): solves a record jointly with the earlier edits,
            installs it and returns the output.
        ratios (`dict` or `list`, *optional*): desired ratios (see [`check_debias_settings`]); uniform by default.
        classifier (`Callable[[list[PIL.Image.Image], list[str]], list[str]]`, *optional*): one of the labels per
            image; [`clip_zero_shot_classifier`] of `clip_model` by default.
        tolerance (`float`, defaults to 0.05), max_iterations (`int`, defaults to 10): largest gap of a reached
            concept, in (0, 1); budget of solves.
        options: [`DebiasOptions`] fields.

    Returns:
        `ConceptEditOutput`: the last solve's; `report.ratios` has per concept and attribute set `concept`,
        `attributes`, `target`, `before`, `after`, `iterations` (weight updates), `reached`, `weights`, `history` and
        `seeds` (both per measurement).
    """
    targets = record.debias
    desired, opts = check_debias_settings(targets, ratios, tolerance, max_iterations, options)
    acc = opts.accelerator
    if classifier is None:
        classifier = clip_zero_shot_classifier(opts.clip_model, getattr(acc, "device", None) or pipe._execution_device)
        classifier.load()
    elif not callable(classifier):
        raise TypeError(f"classifier must be callable (images, labels) -> labels, got {classifier!r}")
    weights = {t.concept: [[0.0] * len(group) for group in t.attribute_sets] for t in targets}
    rows = {t.concept: {"history": [], "seeds": [], "reached": False} for t in targets}
    active, output = list(targets), None
    snapshot = pipe._uce_snapshot()
    bar = tqdm(total=max_iterations, desc="debias", disable=not getattr(acc, "is_main_process", True))
    try:
        for index in range(max_iterations + 1):
            seeds = [opts.seed + index * opts.num_images + j for j in range(opts.num_images)]
            measured = _measure(pipe, active, classifier, opts, seeds)
            gaps = {t.concept: max(abs(d - m) for ds, ms in zip(desired[t.concept], measured[t.concept])
                                   for d, m in zip(ds, ms)) for t in active}
            for t in active:  # (float slack: |0.5 - 0.55| reads 0.05000000000000004)
                row = rows[t.concept]
                row["history"].append(measured[t.concept]), row["seeds"].append(seeds)
                row["reached"] = gaps[t.concept] <= tolerance + 1e-9
            active = [t for t in active if not rows[t.concept]["reached"]]
            bar.set_postfix(max_gap=f"{max(gaps.values()):.3f}", reached=len(targets) - len(active))
            logger.info(f"debias measurement {index}: gaps {gaps}")
            if not active or index == max_iterations:
                break
            for t in active:
                weights[t.concept] = [[w + opts.step * (d - m) for w, d, m in zip(ws, ds, ms)] for ws, ds, ms in
                                      zip(weights[t.concept], desired[t.concept], measured[t.concept])]
            output = solve(record.with_debias_weights(weights))
            bar.update(1)
        if output is None:  # every concept was within tolerance before any edit
            output = solve(record.with_debias_weights(weights))
        for t in active:  # what is left unreached after the budget
            logger.warning(f"debias: {t.concept!r} did not reach its ratios within max_iterations={max_iterations} "
                           f"(gap {gaps[t.concept]:.3f} > tolerance {tolerance}): its weights move toward them but "
                           "stop short; raise max_iterations, or num_images for steadier measurements")
    except BaseException:
        pipe._uce_restore(snapshot)
        raise
    finally:
        bar.close()
    output.report.ratios = [
        {"concept": t.concept, "attributes": list(group), "target": desired[t.concept][s],
         "before": r["history"][0][s],
         "after": r["history"][-1][s], "iterations": len(r["history"]) - 1, "reached": r["reached"],
         "weights": weights[t.concept][s], "history": [h[s] for h in r["history"]], "seeds": r["seeds"]}
        for t in targets for r in [rows[t.concept]] for s, group in enumerate(t.attribute_sets)]
    return output


def _measure(pipe, targets, classifier, opts, seeds) -> dict:
    """Ratios ``{concept: [[fraction per attribute] per set]}`` of `targets` on images from `seeds`."""
    tpl = opts.prompt_templates
    jobs = [(t, tpl[j % len(tpl)].format(t.concept), seed) for t in targets for j, seed in enumerate(seeds)]

    def classify(jobs):  # this process's images, labelled per target and attribute set
        images, results = _generate(pipe, [(prompt, seed) for _, prompt, seed in jobs], opts), []
        for t in dict.fromkeys(t for t, _, _ in jobs):
            mine = [image for (u, _, _), image in zip(jobs, images) if u is t]
            results += [(t, s, len(mine), classifier(mine, list(group))) for s, group in enumerate(t.attribute_sets)]
        return results

    if opts.accelerator is None:
        results = classify(jobs)
    else:  # gather_object concatenates the processes' lists in process order
        with opts.accelerator.split_between_processes(jobs) as mine:
            from accelerate.utils import gather_object

            results = gather_object(classify(list(mine)))
    counts = {t.concept: [[0] * len(group) for group in t.attribute_sets] for t in targets}
    for t, s, n, got in results:  # validated after gathering, so that every process raises alike
        labels = list(t.attribute_sets[s])
        if not isinstance(got, (list, tuple)) or len(got) != n:
            raise ValueError(f"the attribute classifier must return a list with one label per image ({n} images of "
                             f"{t.concept!r}), got {str(got)[:200]}")
        for label in got:
            if label not in labels:
                raise ValueError(f"the attribute classifier returned {label!r} for an image of {t.concept!r}; "
                                 f"allowed labels: {labels}")
            counts[t.concept][s][labels.index(label)] += 1
    return {c: [[k / sum(ks) for k in ks] for ks in sets] for c, sets in counts.items()}


def _generate(pipe, jobs, opts) -> list:
    """PIL images of `(prompt, seed)` jobs, in batches, with the pipeline's progress bar off meanwhile.

    Only the arguments every family's pipeline takes (SD 1.x/2.x, SDXL, FLUX); unset ones keep the pipeline's default.
    """
    call = {k: v for k, v in (("num_inference_steps", opts.num_inference_steps), ("height", opts.height),
                              ("width", opts.width), ("guidance_scale", opts.guidance_scale)) if v is not None}
    images = []
    shown = getattr(opts.accelerator, "is_main_process", True) and len(jobs) > opts.batch_size
    with quiet_pipeline(pipe), tqdm(total=len(jobs), desc="debias: generating images", unit="image", leave=False,
                                    disable=not shown) as bar:
        for start in range(0, len(jobs), opts.batch_size):
            batch = jobs[start:start + opts.batch_size]
            images += generate_seeded(pipe, [p for p, _ in batch], [s for _, s in batch], **call)
            bar.update(len(batch))
    return images


def clip_zero_shot_classifier(model_id_or_path: str | os.PathLike = "openai/clip-vit-base-patch32", device=None, *,
                              template: str = "{}", local_files_only: bool = False):
    r"""CLIP zero-shot attribute classifier for [`debias_loop`]: per image, the label whose text matches it best.

    Loads on first use (or `.load()`); raises an `OSError` saying what to pass instead if the model cannot load, and
    a `ConnectionError` within seconds when the Hub cannot be reached (or `HF_HUB_OFFLINE=1`) and the model is not
    cached.

    Args:
        model_id_or_path (`str` or `os.PathLike`, defaults to `"openai/clip-vit-base-patch32"`, the authors'):
            Hub id or local folder of a CLIP model with its processor.
        device (`str` or `torch.device`, *optional*): where CLIP runs; CUDA if available, else the CPU.
        template (`str`, defaults to `"{}"`): the text of a label, e.g. `"a photo of a {} person"`; the authors use
            the bare attribute.
        local_files_only (`bool`, defaults to `False`): never download.

    Example:
    ```py
    >>> classify = clip_zero_shot_classifier("openai/clip-vit-base-patch32")
    >>> classify(pipe("a doctor", num_images_per_prompt=4).images, ["male", "female"])  # ['male', 'male', ...]
    ```
    """
    if not isinstance(template, str) or template.count("{}") != 1:
        raise ValueError(f"template must contain one '{{}}', got {template!r}")
    device = device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    loaded = []  # the processor and the model, once loaded

    def load():
        if not loaded:
            from transformers import CLIPModel, CLIPProcessor

            offline = local_files_only or local_files_only_for(
                model_id_or_path, what="the CLIP model of the debias classifier",
                instead="give a local CLIP folder (options={'clip_model': PATH}, CLI --clip-model PATH; "
                        "diffusers_uce.demo.make_demo_clip(PATH) saves a tiny random one for trying), or your own "
                        "classifier=")
            try:
                loaded[:] = [CLIPProcessor.from_pretrained(model_id_or_path, local_files_only=offline),
                             CLIPModel.from_pretrained(model_id_or_path, local_files_only=offline).to(device)]
            except (OSError, ValueError) as error:
                raise OSError(
                    f"could not load the CLIP model {os.fspath(model_id_or_path)!r} of the debias classifier "
                    f"({error})."
                    " Offline, give a local CLIP folder (options={'clip_model': PATH}, CLI --clip-model PATH) "
                    "or your own classifier=") from error
        return classify

    @torch.no_grad()
    def classify(images, labels) -> list:
        processor, model = load() and loaded
        inputs = processor(text=[template.format(label) for label in labels], images=list(images), return_tensors="pt",
                           padding=True).to(device)
        return [labels[k] for k in model(**inputs).logits_per_image.argmax(-1).tolist()]

    classify.load = load
    return classify

"""Evaluate a concept edit: base and edited images from the same seeds, scored side by side.

`evaluate_edit` reads a prompt CSV (the paper's format: `case_number, prompt, evaluation_seed`, optionally
`evaluation_guidance` and a label column such as `class` or `artist`), generates one image per row with the base and
with the edited pipeline, and scores them with whatever is available locally: NudeNet detections, CLIP score, CLIP
zero-shot accuracy, LPIPS, and two always-available pixel metrics. Nothing is ever downloaded: a metric whose model is
not installed or cached is reported as skipped, with the reason. Prompt texts are never logged (I2P prompts describe
disturbing content); rows are referred to by case number.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
from dataclasses import dataclass

import torch
from diffusers.utils import logging
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from ..utils.checks import is_whole_number
from ..utils.files import atomic_path
from ..utils.generation import generate_seeded, quiet_pipeline
from .metrics import LABEL_COLUMNS, METRICS, check_metrics, format_summary, score_rows, summarise

__all__ = ["METRICS", "PromptRow", "evaluate_edit", "format_summary", "load_prompts", "make_grid"]

logger = logging.get_logger(__name__)

REQUIRED_COLUMNS = ("case_number", "prompt", "evaluation_seed")
# Pipelines whose `guidance_scale` is not classifier-free guidance (FLUX.1 is guidance-distilled: its guidance is an
# input of the transformer, 3.5 by default), so the CSVs' `evaluation_guidance` (CFG scales for SD) does not apply.
DISTILLED_GUIDANCE_PIPELINES = ("FluxPipeline",)
_CASE = re.compile(r"[\w.-]+")


@dataclass(frozen=True)
class PromptRow:
    """One row of a prompt CSV: `case` names its images, `guidance` is `None` when the CSV has none for it."""

    case: str
    prompt: str
    seed: int
    guidance: float | None = None
    label: str | None = None


def load_prompts(path: str | os.PathLike, *, label_column: str | None = None) -> tuple[list[PromptRow], str | None]:
    """Read a prompt CSV; every check happens here, before any model runs.

    Args:
        path (`str` or `os.PathLike`): the CSV, with at least `case_number`, `prompt` and `evaluation_seed`.
        label_column (`str`, *optional*): the column holding each row's label for CLIP accuracy; by default the first
            of `class`, `artist`, `profession`, `label` that the CSV has. `""` means none.

    Returns:
        `tuple[list[PromptRow], str | None]`: the rows in file order and the label column used.
    """
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        columns = [c for c in (reader.fieldnames or []) if c]
        missing = [c for c in REQUIRED_COLUMNS if c not in columns]
        if missing:
            raise ValueError(f"{path}: missing column(s) {', '.join(missing)} "
                             f"(it has: {', '.join(columns) or 'none'});"
                             f" a prompt CSV needs {', '.join(REQUIRED_COLUMNS)}")
        if label_column is None:
            label_column = next((c for c in LABEL_COLUMNS if c in columns), None)
        elif label_column and label_column not in columns:
            raise ValueError(f"{path}: no label column {label_column!r} (it has: {', '.join(columns)})")
        rows, seen = [], set()
        for line, raw in enumerate(reader, start=2):
            case = (raw["case_number"] or "").strip()
            if not _CASE.fullmatch(case) or case in seen:
                raise ValueError(f"{path}, line {line}: case_number {case!r} is empty, a duplicate or not usable as a "
                                 "file name (letters, digits, '_', '-', '.')")
            seen.add(case)
            try:
                seed = int(float(raw["evaluation_seed"]))
                guidance = raw.get("evaluation_guidance") or None
                guidance = float(guidance) if guidance is not None else None
            except (TypeError, ValueError):
                raise ValueError(f"{path}, case {case}: evaluation_seed/evaluation_guidance is not a number") from None
            label = ((raw.get(label_column) or "").strip() or None) if label_column else None
            rows.append(PromptRow(case, raw["prompt"] or "", seed, guidance, label))
    if not rows:
        raise ValueError(f"{path}: no prompt rows")
    return rows, label_column or None


def evaluate_edit(
    pipe, prompts_csv: str | os.PathLike, output_dir: str | os.PathLike, *, base_pipe=None,
    num_inference_steps: int = 50, guidance_scale: float | None = None, height: int | None = None,
    width: int | None = None, batch_size: int = 4, limit: int | None = None, metrics=METRICS,
    clip_model: str | os.PathLike | None = None, nudenet_threshold: float = 0.6, label_column: str | None = None,
    label_template: str | None = None, grid_rows: int = 8, overwrite: bool = False, accelerator=None,
    allow_safety_checker: bool = False,
) -> dict:
    r"""Generate base and edited images for every prompt row with the same seeds, score them and write a report.

    Writes, under `output_dir`: `images/base/{case_number}.png` and `images/edited/{case_number}.png`,
    `results.csv` (one line per row: metric values for base and edited), `summary.json` (per metric: base and
    edited means, delta and count; skipped metrics with the reason; the edit records; the settings) and `grid.png`
    (the first `grid_rows` rows, base | edited). Runs are resumable: images already on disk are reused, as long as
    they were made with the same settings (`images/settings.json`); otherwise a `ValueError` asks for
    `overwrite=True` or another folder. Prompt texts are never logged (rows are named by case number), not even in
    diffusers' truncation warning. A pipeline with an active safety checker is refused: it blackens flagged images,
    which skews every metric (NudeNet counts first); load it with `safety_checker=None`.

    Args:
        pipe (`DiffusionPipeline`): the edited pipeline (with `diffusers_uce` attached, or any pipeline when
            `base_pipe` is given, e.g. a fused, saved edit).
        prompts_csv (`str` or `os.PathLike`): a CSV with `case_number`, `prompt`, `evaluation_seed` and optionally
            `evaluation_guidance` and a label column (see `load_prompts`).
        output_dir (`str` or `os.PathLike`): where images and reports go (created if needed).
        base_pipe (`DiffusionPipeline`, *optional*): the unedited pipeline. By default `pipe` itself with its edit
            switched off (`set_concept_edit_scale(0)`, restored afterwards; processor or fused mode), so one
            pipeline in memory suffices.
        num_inference_steps (`int`, defaults to 50): denoising steps.
        guidance_scale (`float`, *optional*): the guidance of every row. By default each row's
            `evaluation_guidance` (a classifier-free guidance scale, as the paper's CSVs give for Stable Diffusion),
            else the pipeline's own default (7.5 for SD 1.x/2.x, 5.0 for SDXL). FLUX pipelines are guidance-distilled:
            they ignore `evaluation_guidance` (with a warning) and use their own default (3.5) unless this is given.
        height (`int`, *optional*): image height; the pipeline's default if not given. The same arguments serve
            every family (SD 1.x/2.x, SDXL, FLUX); none of them takes a negative prompt here.
        width (`int`, *optional*): image width; the pipeline's default if not given.
        batch_size (`int`, defaults to 4): prompts per pipeline call (rows with equal guidance are batched).
        limit (`int`, *optional*): only the first `limit` rows.
        metrics (`tuple[str]` or `str`): any of `"nudenet"` (exposed-class detections per image at
            `nudenet_threshold`), `"clip_score"` (100 × cosine of image and prompt, floored at 0), `"clip_accuracy"`
            (zero-shot: the image's nearest label among all labels of the CSV), `"lpips"` (base vs edited),
            `"pixel_mae"` (mean absolute pixel difference, 0–1) and `"psnr"` (dB, capped at 100).
        clip_model (`str` or `os.PathLike`, *optional*): a local CLIP folder or a Hub id already in the cache (e.g.
            `"openai/clip-vit-large-patch14"`), loaded with `local_files_only=True`; CLIP metrics are skipped without.
        nudenet_threshold (`float`, defaults to 0.6): minimum NudeNet detection score.
        label_column (`str`, *optional*): see `load_prompts`.
        label_template (`str`, *optional*): CLIP text for a label, e.g. `"an image of a {}"` (by default one per
            label column: `LABEL_TEMPLATES`, else the label itself).
        grid_rows (`int`, defaults to 8): rows in `grid.png`.
        overwrite (`bool`, defaults to `False`): regenerate every image even if it is on disk.
        accelerator (`accelerate.Accelerator` or `accelerate.PartialState`, *optional*): split the rows across
            processes (`split_between_processes`); each process generates its share with its own copy of the
            pipelines (already moved to its device) into `output_dir`, which all processes must see; then the main
            process scores every row and writes the reports.
        allow_safety_checker (`bool`, defaults to `False`): evaluate even when a pipeline has an active safety
            checker (its blackened images then count as clean).

    Returns:
        `dict`: the summary written to `summary.json` (an empty dict on processes other than the main one).

    Example:
    ```py
    >>> pipe = diffusers_uce.attach(StableDiffusionPipeline.from_pretrained("CompVis/stable-diffusion-v1-4"))
    >>> pipe.apply_concept_edits(erase="Van Gogh", guide="art")
    >>> summary = evaluate_edit(pipe, "holdout100_prompts.csv", "eval-van-gogh",
    ...                         clip_model="openai/clip-vit-large-patch14")
    >>> print(format_summary(summary))
    ```
    """
    metrics = check_metrics(metrics)
    for name, value in (("num_inference_steps", num_inference_steps), ("batch_size", batch_size),
                        ("limit", 1 if limit is None else limit), ("grid_rows", grid_rows)):
        if not is_whole_number(value, 1):
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    all_rows, label_column = load_prompts(prompts_csv, label_column=label_column)
    rows = all_rows[:limit]
    edits = tuple(getattr(pipe, "concept_edits", ()))
    if base_pipe is None and not edits:
        raise ValueError("pipe has no concept edits to switch off for the base images: apply or load an edit, or "
                         "pass base_pipe (the unedited model) to evaluate a fused, saved edit")
    for p in (pipe, base_pipe):
        if p is not None and getattr(p, "safety_checker", None) is not None:
            if not allow_safety_checker:
                raise ValueError("a pipeline has an active safety checker: flagged images come out black, which skews "
                                 "the metrics; load it with safety_checker=None (or set pipe.safety_checker = None), "
                                 "or pass allow_safety_checker=True to evaluate it anyway")
            logger.warning("a pipeline has a safety checker: flagged images come out black, which skews the metrics")
    settings = {
        "model": getattr(pipe, "name_or_path", None), "base": getattr(base_pipe, "name_or_path", None)
        if base_pipe is not None else "the same pipeline at concept edit scale 0",
        "edits": [e.to_dict() for e in edits], "edit_scale": _edit_scale(pipe), "num_inference_steps":
        num_inference_steps, "guidance_scale": guidance_scale, "height": height, "width": width,
    }
    image_dir = os.path.join(output_dir, "images")
    for which in ("base", "edited"):
        os.makedirs(os.path.join(image_dir, which), exist_ok=True)
    _check_settings(os.path.join(image_dir, "settings.json"), settings, overwrite)

    is_main = accelerator is None or accelerator.is_main_process
    if accelerator is not None:
        with accelerator.split_between_processes(rows) as share:
            share = list(share)
    else:
        share = rows
    generated = _generate(pipe, base_pipe, share, image_dir, batch_size=batch_size, overwrite=overwrite,
                          progress=is_main, guidance=_row_guidance(pipe, share, guidance_scale),
                          num_inference_steps=num_inference_steps, height=height, width=width)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    if not is_main:
        return {}

    paths = {r.case: [os.path.join(image_dir, w, f"{r.case}.png") for w in ("base", "edited")] for r in rows}
    done = [r for r in rows if all(os.path.exists(p) for p in paths[r.case])]
    missing = sorted({r.case for r in rows} - {r.case for r in done}, key=[r.case for r in rows].index)
    if missing:  # another process failed, or was interrupted
        logger.warning(f"{len(missing)} row(s) have no image pair, not scored: cases {', '.join(missing[:10])}")
    device = getattr(pipe, "_execution_device", None) or torch.device("cpu")
    labels = sorted({r.label for r in all_rows if r.label})
    records, skipped, extras = score_rows(done, paths, metrics, labels, label_column, device=device,
                                          clip_model=clip_model, nudenet_threshold=nudenet_threshold,
                                          label_template=label_template, batch_size=batch_size)
    summary = {
        "metrics": summarise(records, [m for m in metrics if m not in skipped], extras),
        "skipped": skipped,
        "edits": settings["edits"],
        "settings": {**settings, "prompts": os.fspath(prompts_csv), "rows": len(rows), "batch_size": batch_size,
                     "metrics": list(metrics), "nudenet_threshold": nudenet_threshold, "clip_model":
                     None if clip_model is None else os.fspath(clip_model), "label_column": label_column,
                     "processes": 1 if accelerator is None else accelerator.num_processes},
        "images": {"rows": len(rows), "scored": len(done), "missing": missing, "generated_here": generated},
    }
    summary = json.loads(json.dumps(summary))  # what summary.json holds: lists, not tuples
    _write_atomic(os.path.join(output_dir, "results.csv"), lambda f: _write_csv(f, records), newline="")
    _write_atomic(os.path.join(output_dir, "summary.json"), lambda f: json.dump(summary, f, indent=2))
    if done:
        grid = make_grid([paths[r.case] for r in done[:grid_rows]], [f"case {r.case}" for r in done[:grid_rows]])
        _write_atomic(os.path.join(output_dir, "grid.png"), lambda f: grid.save(f, format="PNG"), mode="wb")
    logger.info(f"Scored {len(done)} image pair(s); skipped metrics: {', '.join(skipped) or 'none'}")
    return summary


def _edit_scale(pipe) -> float | None:
    return getattr(pipe, "concept_edit_scale", None)


@contextlib.contextmanager
def _edit_off(pipe):
    """`pipe` with its concept edit at scale 0, restored (even on error) on exit."""
    scale = _edit_scale(pipe)
    pipe.set_concept_edit_scale(0.0)
    try:
        yield pipe
    finally:
        pipe.set_concept_edit_scale(scale)


def _check_settings(path: str, settings: dict, overwrite: bool) -> None:
    if os.path.exists(path) and not overwrite:
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
        changed = sorted(k for k in settings if old.get(k) != json.loads(json.dumps(settings[k])))
        if changed:
            raise ValueError(f"{os.path.dirname(path)} holds images made with other settings ({', '.join(changed)} "
                             "differ): pass overwrite=True (--overwrite) to regenerate them, or use another "
                             "output_dir")
    else:
        _write_atomic(path, lambda f: json.dump(settings, f, indent=2))


def _row_guidance(pipe, rows: list[PromptRow], guidance_scale: float | None) -> dict[str, float | None]:
    """Guidance per case: `guidance_scale`, else the row's (not for guidance-distilled pipelines), else `None`: the
    pipeline's own default."""
    if guidance_scale is not None:
        return {r.case: guidance_scale for r in rows}
    distilled = any(c.__name__ in DISTILLED_GUIDANCE_PIPELINES for c in type(pipe).__mro__)
    if distilled and any(r.guidance is not None for r in rows):
        logger.warning(f"{type(pipe).__name__} is guidance-distilled: the CSV's evaluation_guidance (a "
                       "classifier-free "
                       "guidance scale) is ignored and the pipeline's default guidance used; pass guidance_scale "
                       "(--guidance) to set it")
    return {r.case: None if distilled else r.guidance for r in rows}


def _generate(pipe, base_pipe, rows, image_dir, *, batch_size, overwrite, progress, guidance,
              **call) -> dict[str, int]:
    """Generate the missing images of `rows` in batches of equal `guidance` (per case; `None`: the pipeline's
    default): each batch's base images, then edited."""
    todo = {w: {r.case for r in rows if overwrite or not os.path.exists(os.path.join(image_dir, w, f"{r.case}.png"))}
            for w in ("base", "edited")}
    wanted = sorted((r for r in rows if r.case in todo["base"] | todo["edited"]),
                    key=lambda r: (guidance[r.case] is not None, guidance[r.case] or 0.0))
    logger.info(f"Generating {len(todo['base'])} base and {len(todo['edited'])} edited image(s) for {len(rows)} "
                f"row(s); {2 * len(rows) - len(todo['base']) - len(todo['edited'])} already on disk")
    batches: list[list[PromptRow]] = []
    for r in wanted:  # sorted is stable: file order within one guidance value
        if batches and len(batches[-1]) < batch_size and guidance[batches[-1][0].case] == guidance[r.case]:
            batches[-1].append(r)
        else:
            batches.append([r])
    counts = {"base": 0, "edited": 0}
    with tqdm(total=len(wanted), desc="Generating", unit="prompt", disable=not (progress and wanted)) as bar, \
            contextlib.ExitStack() as stack:
        for p in {id(p): p for p in (pipe, base_pipe) if p is not None}.values():
            stack.enter_context(quiet_pipeline(p))
        for batch in batches:
            for which in ("base", "edited"):
                need = [r for r in batch if r.case in todo[which]]
                if not need:
                    continue
                if which == "edited" or base_pipe is not None:
                    context = contextlib.nullcontext(pipe if which == "edited" else base_pipe)
                else:
                    context = _edit_off(pipe)
                scale = guidance[need[0].case]
                kwargs = {**call, **({} if scale is None else {"guidance_scale": scale})}
                with context as model:
                    images = generate_seeded(model, [r.prompt for r in need], [r.seed for r in need], **kwargs)
                for r, image in zip(need, images):
                    path = os.path.join(image_dir, which, f"{r.case}.png")
                    _write_atomic(path, lambda f, im=image: im.save(f, format="PNG"), mode="wb")
                counts[which] += len(need)
            bar.update(len(batch))
    return counts


def make_grid(pairs: list[list[str | Image.Image]], captions: list[str], cell: int = 256,
              titles: tuple[str, ...] = ("base", "edited")) -> Image.Image:
    """A before/after grid: one row per pair of images (or paths), its caption on the left; columns base | edited.

    Args:
        pairs (`list[list[str | PIL.Image.Image]]`): `[base, edited]` per row.
        captions (`list[str]`): one per row, e.g. `"case 12"` (never the prompt).
        cell (`int`, defaults to 256): the largest cell side; images are shown at their size within 64 and `cell`.
        titles (`tuple[str, ...]`, defaults to `("base", "edited")`): the column titles, one per image of a row.
    """
    pairs = [[Image.open(p) if isinstance(p, (str, os.PathLike)) else p for p in pair] for pair in pairs]
    size = max(64, min(cell, max(max(im.size) for pair in pairs for im in pair)))
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    margin, header = 12 + int(max(draw.textlength(c) for c in captions)), 18
    grid = Image.new("RGB", (margin + len(titles) * size, header + len(pairs) * size), "white")
    draw = ImageDraw.Draw(grid)
    for column, title in enumerate(titles):
        draw.text((margin + column * size + 4, 3), title, fill="black")
    for row, (pair, caption) in enumerate(zip(pairs, captions)):
        draw.text((4, header + row * size + size // 2 - 6), caption, fill="black")
        for column, image in enumerate(pair):
            grid.paste(image.convert("RGB").resize((size, size)), (margin + column * size, header + row * size))
    return grid


def _write_csv(f, records) -> None:
    columns = list(dict.fromkeys(k for r in records for k in r)) or ["case_number", "prompt", "seed", "guidance",
                                                                     "label"]
    writer = csv.DictWriter(f, fieldnames=columns)
    writer.writeheader()
    writer.writerows(records)


def _write_atomic(path: str, write, mode: str = "w", **kwargs) -> None:
    """Call `write(file)` on a temporary file next to `path`, then move it into place (readers never see half)."""
    with atomic_path(path) as tmp:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"}), **kwargs) as f:
            write(f)

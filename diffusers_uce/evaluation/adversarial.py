"""Images from the closed-form attack on an edit: does an erased concept come back from adversarial embeddings?"""

from __future__ import annotations

import contextlib
import json
import os

import torch
from diffusers.utils import logging

from ..utils.checks import is_whole_number
from ..utils.files import write_text_atomic
from ..utils.generation import quiet_pipeline
from .evaluate import _edit_off, _write_atomic, make_grid

logger = logging.get_logger(__name__)

COLUMNS = ("base", "edited", "base, attack", "edited, attack")


def evaluate_adversarial(
    pipe, concepts: list[str], output_dir: str | os.PathLike, *, reg: float = 0.1, seed: int = 0,
    num_inference_steps: int = 50, guidance_scale: float | None = None, height: int | None = None,
    width: int | None = None,
) -> dict:
    r"""A before/after grid of each concept from its prompt and from the attacker's embeddings of the applied edit.

    For every concept, four images from the same seed: the base model (the edit at scale 0) and the edited model
    from the prompt, then both from `pipe.adversarial_embeds(concept, reg)`, the text embeddings that best bring the
    concept back through the edited layers. Writes `images/{i}_{column}.png`, `grid.png` (one row per concept,
    captioned "concept i") and `summary.json` (the settings and, when the edit was solved here, its robustness rows).
    Needs a GPU for real models.

    Args:
        pipe (`DiffusionPipeline`): a pipeline with `diffusers_uce` attached and an edit applied or loaded.
        concepts (`list[str]`): the prompts to attack, e.g. the erased concepts.
        output_dir (`str` or `os.PathLike`): where the images go (created if needed).
        reg (`float`, defaults to 0.1): the attacker's ``ρ`` (see `adversarial_embeds`).
        seed (`int`, defaults to 0): the seed of every image.
        num_inference_steps (`int`, defaults to 50): passed to the pipeline.
        guidance_scale (`float`, *optional*): passed to the pipeline (its default when not given).
        height (`int`, *optional*): passed to the pipeline (its default when not given).
        width (`int`, *optional*): passed to the pipeline (its default when not given).

    Returns:
        `dict`: the summary written to `summary.json`.

    Example:
    ```py
    >>> pipe.apply_concept_edits(moderate="nudity", harden=True)
    >>> evaluate_adversarial(pipe, ["nudity"], "attack-nudity")
    ```
    """
    if isinstance(concepts, str) or not concepts or not all(isinstance(c, str) and c.strip() for c in concepts):
        raise ValueError(f"concepts must be a non-empty list of prompts, got {concepts!r}")
    if not is_whole_number(num_inference_steps, 1):
        raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
    if not is_whole_number(seed, 0):
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    attacks = [pipe.adversarial_embeds(c, reg=reg) for c in concepts]  # validates reg and that an edit is there
    call = {"num_inference_steps": num_inference_steps, "height": height, "width": width, "output_type": "pil",
            **({} if guidance_scale is None else {"guidance_scale": guidance_scale})}
    image_dir = os.path.join(output_dir, "images")
    os.makedirs(image_dir, exist_ok=True)
    rows = []
    with quiet_pipeline(pipe), torch.no_grad():
        for i, (concept, attack) in enumerate(zip(concepts, attacks)):
            images = {}
            for column, inputs in zip(COLUMNS, ({"prompt": concept}, {"prompt": concept}, attack, attack)):
                off = column.startswith("base")
                with (_edit_off(pipe) if off else contextlib.nullcontext(pipe)) as model:
                    images[column] = model(**inputs, generator=torch.Generator().manual_seed(seed), **call).images[0]
                path = os.path.join(image_dir, f"{i}_{column.replace(', ', '_')}.png")
                _write_atomic(path, lambda f, im=images[column]: im.save(f, format="PNG"), mode="wb")
            rows.append([images[c] for c in COLUMNS])
    grid = make_grid(rows, [f"concept {i}" for i in range(len(concepts))], titles=COLUMNS)
    _write_atomic(os.path.join(output_dir, "grid.png"), lambda f: grid.save(f, format="PNG"), mode="wb")
    report = getattr(pipe, "concept_edit_report", None)
    summary = {"concepts": list(concepts), "reg": reg, "seed": seed, "columns": list(COLUMNS),
               "settings": {k: v for k, v in call.items() if k != "output_type"},
               "edits": [e.to_dict() for e in pipe.concept_edits],
               "robustness": report.robustness if report is not None else None}
    write_text_atomic(os.path.join(output_dir, "summary.json"), json.dumps(summary, indent=2))
    logger.info(f"Wrote the adversarial grid of {len(concepts)} concept(s) to {output_dir}")
    return json.loads(json.dumps(summary))


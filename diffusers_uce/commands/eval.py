"""`diffusers-uce eval`: generate images with the base and the edited model from the same seeds, and score them."""

from __future__ import annotations

import argparse
import os

from .common import (
    DEMO_MODELS,
    SUPPORTED,
    add_device_arguments,
    add_model_arguments,
    argument_type,
    check_model,
    load_pipeline,
    model_options,
    positive_int,
    progress,
    resolve_device,
    resolve_dtype,
)

HELP = ("generate images with the base and the edited model from the same seeds and score them (NudeNet, CLIP, "
        "LPIPS, pixel differences)")

EPILOG = """\
examples:
  diffusers-uce edit --erase "van gogh" --guide art --save-edits ./no-van-gogh
  diffusers-uce eval --edits ./no-van-gogh --prompts prompts.csv --output ./eval-demo --steps 10
  diffusers-uce eval --model CompVis/stable-diffusion-v1-4 --edits me/no-van-gogh --prompts holdout100_prompts.csv \\
      --output ./eval-van-gogh --clip-model openai/clip-vit-large-patch14 --device cuda --dtype float16
  diffusers-uce eval --model ./sd14-no-nudity --base-model CompVis/stable-diffusion-v1-4 \\
      --prompts unsafe-prompts4703.csv --metrics nudenet --output ./eval-i2p --device cuda --dtype float16

Each row's image is generated twice with its evaluation_seed: by the base model (--base-model, else --model with the
edit switched off) and by the edited one. Metrics whose model is missing (nudenet not installed, no --clip-model,
no cached LPIPS weights) are reported as skipped; nothing is downloaded. Prompts are never printed.
Several GPUs: 'accelerate launch -m diffusers_uce.commands.uce_cli eval ...' splits the rows between processes.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the arguments of `diffusers-uce eval` to its parser."""
    from ..evaluation.metric_names import METRICS, check_metrics

    add = parser.add_argument
    add("--prompts", required=True, metavar="CSV",
        help="prompt CSV with case_number, prompt, evaluation_seed (optional: evaluation_guidance, and a class/"
             "artist/profession/label column for CLIP accuracy), e.g. the paper's holdout100_prompts.csv (required)")
    add("--output", required=True, metavar="DIR",
        help="where images/, results.csv, summary.json and grid.png go; rerunning resumes (required)")
    add("--model", default="demo", metavar="M",
        help=f"the edited model: Hub repo id or local folder (e.g. a fused 'edit --output' folder) of {SUPPORTED}, "
             f"or a demo pipeline: {', '.join(DEMO_MODELS)}")
    add("--edits", metavar="PATH_OR_REPO",
        help="load this edit (file, folder or Hub repo written by --save-edits) onto --model; the base images are "
             "then --model with the edit switched off")
    add("--base-model", metavar="M2",
        help="the unedited model, when --model is an already edited (fused) model")
    add("--steps", type=positive_int, default=50, metavar="N", help="denoising steps")
    add("--guidance", type=float, metavar="F",
        help="guidance scale (default: each row's evaluation_guidance, else 7.5)")
    add("--size", type=positive_int, metavar="PX", help="image height and width (default: the model's)")
    add("--batch-size", type=positive_int, default=4, metavar="N", help="prompts per pipeline call")
    add("--limit", type=positive_int, metavar="N", help="only the first N rows of the CSV")
    add("--metrics", type=argument_type(check_metrics), default=METRICS, metavar="A,B",
        help=f"comma-separated, from {', '.join(METRICS)} (default: all; unavailable ones are reported as skipped)")
    add("--clip-model", metavar="PATH_OR_ID",
        help="CLIP model for clip_score/clip_accuracy: a local folder or a Hub id already in the cache "
             "(e.g. openai/clip-vit-large-patch14); never downloaded")
    add("--nudenet-threshold", type=float, default=0.6, metavar="F", help="minimum NudeNet detection score")
    add("--overwrite", action="store_true", help="regenerate images already in --output")
    add("--keep-safety-checker", action="store_true",
        help="keep the model's safety checker (default: it is switched off, since it blackens flagged images and "
             "so skews every metric, NudeNet counts first)")
    add_device_arguments(parser, purpose="generate and score", models="the models")
    add_model_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Run `diffusers-uce eval`: check the CSV, load the model(s), generate base and edited images, score them and
    print a table of the results.

    Returns:
        `int`: 0; failures raise (the command line turns them into a one-line error and exit code 2).
    """
    from ..evaluation.evaluate import evaluate_edit, format_summary, load_prompts

    load_prompts(args.prompts)  # fail fast, before loading any weights
    if args.edits is None and args.base_model is None:
        raise ValueError("nothing to compare: pass --edits PATH_OR_REPO (base = --model with the edit switched off), "
                         "or --base-model M2 (the unedited model) when --model is an edited, fused model")
    for model in (args.model, args.base_model):
        if model is not None:
            check_model(model)
    state = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under `accelerate launch`: one share of the rows per process
        from accelerate import PartialState

        state = PartialState()
        device = str(state.device)
    else:
        device = resolve_device(args.device)
    args.dtype = resolve_dtype(args.dtype, device)
    progress(f"Loading model {args.model} ({args.dtype}, {device}) ...")
    pipe = load_pipeline(args.model, args.dtype, device, args.seed, **model_options(args))
    if args.edits is not None:
        progress(f"Loading the edit {args.edits} ...")
        pipe.load_concept_edits(args.edits, cache_dir=args.cache_dir, local_files_only=args.local_files_only)
    base = None
    if args.base_model is not None:
        progress(f"Loading base model {args.base_model} ...")
        base = load_pipeline(args.base_model, args.dtype, device, args.seed, **model_options(args))
    for p in (pipe, base):
        if p is not None and getattr(p, "safety_checker", None) is not None and not args.keep_safety_checker:
            progress("Switching the safety checker off (it blackens flagged images); --keep-safety-checker keeps it")
            p.safety_checker = None
    summary = evaluate_edit(
        pipe, args.prompts, args.output, base_pipe=base, num_inference_steps=args.steps,
        guidance_scale=args.guidance, height=args.size, width=args.size, batch_size=args.batch_size,
        limit=args.limit, metrics=args.metrics, clip_model=args.clip_model,
        nudenet_threshold=args.nudenet_threshold, overwrite=args.overwrite, accelerator=state,
        allow_safety_checker=args.keep_safety_checker,
    )
    if not summary:  # not the main process: it writes and prints the results
        return 0
    print(format_summary(summary))
    progress(f"Wrote images/, results.csv, summary.json and grid.png to {args.output}")
    return 0


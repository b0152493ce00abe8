"""`diffusers-uce edit`: erase, moderate and debias concepts of a pipeline, print the report, and optionally save the
edit (fused pipeline, edit file, LoRA) or push it to the Hub."""

from __future__ import annotations

import argparse
import json
import os

from ..core.edits import TECHNIQUES, TOKEN_MODES, ConceptEdit, concept_edit_request
from ..core.speed_options import METHODS, retain_set
from .common import (
    SUPPORTED,
    add_card_arguments,
    add_device_arguments,
    add_hub_arguments,
    add_model_arguments,
    card_options,
    check_model,
    check_output,
    check_output_file,
    concepts,
    demo_names,
    hub_options,
    load_pipeline,
    model_options,
    positive_int,
    progress,
    resolve_device,
    resolve_dtype,
    write_json_atomic,
)

REPORT_FILE = "uce_report.json"

HELP = "erase concepts toward guides while preserving others, and optionally save the edited pipeline"

EPILOG = """\
examples:
  diffusers-uce edit --erase "Van Gogh; Picasso" --guide art --preserve "Monet; Rembrandt"
  diffusers-uce edit --model CompVis/stable-diffusion-v1-4 --erase "Kelly McKernan" --guide art \\
      --device cuda --dtype float16 --output ./sd14-uce
  diffusers-uce edit --model demo-flux --erase "Van Gogh" --guide art --held-out ""
  diffusers-uce edit --model black-forest-labs/FLUX.1-dev --erase "Van Gogh" --guide art \\
      --device cuda --dtype bfloat16 --save-edits ./flux-no-van-gogh
  diffusers-uce edit --erase "Van Gogh; Picasso" --guide art --preserve @retain:artists --method speed \\
      --method-option threshold=0.1 --method-option augment=10
  diffusers-uce edit --model CompVis/stable-diffusion-v1-4 --erase "Van Gogh" --guide art \\
      --device cuda --dtype float16 --output-single-file ./sd14-no-van-gogh.safetensors

Lists are separated by ";" (names may contain commas). The report shows, per erased concept, the efficacy (1 = its
keys/values became exactly its guide's) and, per preserved or held-out concept, the relative change of its keys/values.
--output-single-file writes one checkpoint in the original layout (SD 1.x/2.x, SDXL) for AUTOMATIC1111 and ComfyUI
(models/Stable-diffusion, models/checkpoints); diffusers loads it with from_single_file(PATH, config=<the model>).
"""

_DEBIAS_ONLY = ("--attributes", "--ratios", "--max-iterations", "--tolerance", "--clip-model")


def _erase_concepts(text: str) -> list[str]:
    if not concepts(text):
        raise argparse.ArgumentTypeError('is empty: give at least one concept to erase, e.g. --erase "Van Gogh"')
    return concepts(text)


def _method_option(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE, e.g. threshold=0.1")
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value.strip()


def _retain_sets(names: list[str]) -> list[str]:
    """`--preserve` with every "@retain:NAME" replaced by that shipped retain vocabulary."""
    out = []
    for name in names:
        out.extend(retain_set(name[len("@retain:"):]) if name.startswith("@retain:") else [name])
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the arguments of `diffusers-uce edit` to its parser."""
    add = parser.add_argument
    add("--model", default="demo", metavar="M",
        help=f"Hub repo id or local folder of {SUPPORTED}; its family, and so the edited layers, follows from the "
             f"class in its model_index.json. Or a built-in tiny offline demo pipeline (random weights; for trying "
             f"the tool): {demo_names()}")
    add("--erase", type=_erase_concepts, metavar='"A; B"',
        help='concepts to erase, separated by ";"; "@file.txt" (one per line) or "@file.csv:column" reads a file '
             "(required unless --moderate or --debias)")
    add("--moderate", type=concepts, metavar='PRESET | "A; B"',
        help="erase toward the unconditional prompt with the paper's moderation defaults (preserve scale 0.1): a "
             "preset (i2p, i2p-paper, nudity) or concepts; combines with --erase")
    add("--expand-prompts", choices=("art", "object"),
        help="also erase the paper's templates around each erased concept and its guide ('painting by {}', ... / "
             "'image of {}', ...)")
    add("--guide", type=concepts, metavar='"G" | "G1; G2"',
        help="what erased concepts become: one guide for all, or one per erased concept; absent or empty means the "
             "unconditional (empty) prompt")
    add("--preserve", type=concepts, default=[], metavar='"P; Q"',
        help="concepts whose keys/values must not change (default: none); with --method speed, the retain set. "
             "@retain:NAME adds a shipped retain vocabulary (artists, instances, celebrities)")
    add("--method", choices=METHODS, default="uce",
        help="'uce' (default), or 'speed': precise erasure, the change confined to what the retain set (--preserve) "
             "does not use, with invariant tokens kept exactly")
    add("--method-option", dest="method_options", action="append", type=_method_option, default=[],
        metavar="KEY=VALUE", help="an option of --method speed (repeatable): threshold, retain_scale, invariant_lamb, "
                                  "augment, filter, seed, invariants (JSON values, e.g. filter=false)")
    add("--erase-scale", type=float, default=1.0, metavar="F", help="weight of the erase terms")
    add("--preserve-scale", type=float, metavar="F",
        help="weight of the preserve terms (default: 1.0 in 'last' token mode, max(0.1, 1 / (1 + #preserved)) "
             "in 'paper' mode)")
    add("--lamb", type=float, default=0.5, metavar="F", help="pull toward the original weights (> 0)")
    add("--token-mode", choices=TOKEN_MODES, default="last",
        help="'last': one token per concept; 'paper': the paper's token blocks")
    add("--technique", choices=TECHNIQUES, default="replace",
        help="'replace': target = the guide's original keys/values; 'tensor': the guide's with their "
             "component along the erased concept's removed (per layer)")
    add("--harden", type=int, default=0, metavar="K",
        help="after the edit, run K hardening rounds (RECE) against adversarial embeddings of the erased concepts; "
             "the report then shows each concept's adversarial recovery before and after every round (default: 0)")
    add("--harden-reg", type=float, metavar="F",
        help="with --harden: the attacker's regulariser rho (default: 0.1; 1e-3 with --expand-prompts)")
    add("--no-edit-keys", dest="edit_keys", action="store_false",
        help="SD/SDXL: edit only the cross-attention value projections (to_v), not the keys (to_k) (default: edit "
             "both). FLUX pipelines edit their text-embedding projections, which have no keys")
    add("--held-out", type=concepts, metavar='"X; Y"',
        help='concepts to measure interference on in the report (default: a built-in generic set; "" for none)')
    add("--output", metavar="DIR",
        help=f"fuse the edit and save the pipeline to DIR (a plain diffusers pipeline folder) with {REPORT_FILE}; "
             "without it, only the report is printed")
    add("--output-single-file", metavar="PATH",
        help="fuse the edit and save the whole pipeline as ONE .safetensors checkpoint in the original (LDM/SGM) "
             "layout that AUTOMATIC1111, ComfyUI and from_single_file load (SD 1.x/2.x and SDXL)")
    add("--overwrite", action="store_true",
        help="write into existing non-empty --output/--save-edits/--lora folders, replace an existing "
             "--output-single-file")
    add("--save-edits", metavar="DIR",
        help="save the edit alone (one small safetensors file and a model card) to DIR, for load_concept_edits()")
    add("--lora", metavar="DIR", help="export the edit as a diffusers-format LoRA (+ model card) to DIR")
    add("--rank", type=positive_int, metavar="R",
        help="with --lora: the LoRA rank (default: exact, the number of edit tokens; lower is approximate)")
    add("--lora-format", choices=("diffusers", "kohya"),
        help="with --lora: 'diffusers' (load_lora_weights; the default) or 'kohya': one uce_lora.safetensors in the "
             "kohya/sd-scripts layout for AUTOMATIC1111 and ComfyUI (SD 1.x/2.x, SDXL)")
    add("--plot", metavar="PATH",
        help="draw the report (efficacy, interference, recovery per hardening round) to this image file (.png, .svg "
             "or .pdf; needs matplotlib); the model cards of --output/--save-edits/--lora then show it as report.png")
    add("--push-to-hub", metavar="REPO",
        help="push the edit (edit file, its exact LoRA, model card, community pipeline.py) to this Hub repository in "
             "one commit")
    add_hub_arguments(parser)
    add_card_arguments(parser)
    add_device_arguments(parser, purpose="load the model and solve", seed_note="the edit itself is deterministic")
    add_model_arguments(parser)
    _add_debias_arguments(parser)


def _add_debias_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument_group("debiasing (generates images and classifies them with CLIP)").add_argument
    add("--debias", type=concepts, metavar='"C; D"',
        help='concepts to debias, e.g. "doctor; nurse": images of each are generated and classified, and its '
             "attribute weights move until the ratios are reached (with or without --erase)")
    add("--attributes", type=concepts, metavar='"A; B"',
        help='with --debias: the attributes, e.g. "male; female" (the same for every concept)')
    add("--ratios", type=float, nargs="+", metavar="R",
        help="with --debias: desired ratio of each attribute, summing to 1 (default: uniform)")
    add("--max-iterations", type=positive_int, metavar="N", help="with --debias: budget of solves (default: 10)")
    add("--tolerance", type=float, metavar="F",
        help="with --debias: largest gap |desired - measured| of a reached concept (default: 0.05)")
    add("--clip-model", metavar="PATH_OR_ID",
        help="with --debias: the CLIP model that classifies the images, a local folder or a Hub id (default: "
             "openai/clip-vit-base-patch32, downloaded if not cached; offline, give a local folder)")


def _requests(args: argparse.Namespace) -> tuple[ConceptEdit | None, ConceptEdit | None]:
    """The validated erase request (`None` without `--erase`/`--moderate`) and debias request (`None` without
    `--debias`) of the flags; concept files are read here, before any model is loaded."""
    moderate = None if not args.moderate else args.moderate[0] if len(args.moderate) == 1 else args.moderate
    if not args.debias:
        for flag in _DEBIAS_ONLY:
            if getattr(args, flag[2:].replace("-", "_")) is not None:
                raise ValueError(f"{flag} only applies with --debias")
        if not args.erase and moderate is None:
            raise ValueError('give --erase "A; B" (concepts to erase), --moderate PRESET, or --debias "C; D" '
                             '--attributes "A; B"')
    elif not args.attributes:
        raise ValueError('--debias needs --attributes, e.g. --attributes "male; female"')
    options = dict(erase_scale=args.erase_scale, preserve_scale=args.preserve_scale, lamb=args.lamb,
                   token_mode=args.token_mode, technique=args.technique)
    args.preserve = _retain_sets(args.preserve)
    erase = None
    if args.harden_reg is not None and not args.harden:
        raise ValueError("--harden-reg only applies with --harden K")
    if args.erase or moderate is not None:
        erase = concept_edit_request(args.erase, args.guide or None, args.preserve, moderate=moderate,
                                     expand_prompts=args.expand_prompts, harden=args.harden,
                                     harden_options=_harden_options(args), method=args.method,
                                     method_options=dict(args.method_options), **options)
    elif args.harden:
        raise ValueError("--harden needs erased concepts (--erase or --moderate)")
    elif args.method != "uce" or args.method_options:
        raise ValueError("--method/--method-option apply to --erase/--moderate edits")
    if not args.debias:
        return erase, None
    # Checked against the erase request and with every preserved concept, so that a concept both debiased and erased
    # or preserved is refused here; the debias solve itself gets the preserved concepts only when nothing is erased.
    debias = concept_edit_request(None, None, args.preserve, debias={c: args.attributes for c in args.debias},
                                  earlier=(erase,) if erase else (), **options)
    from ..loaders.debias import check_debias_settings

    check_debias_settings(debias.debias, args.ratios, _tolerance(args), _max_iterations(args))
    return erase, debias


def _harden_options(args: argparse.Namespace) -> dict | None:
    return None if args.harden_reg is None else {"reg": args.harden_reg}


def _resolved_harden(record: ConceptEdit) -> dict:
    """The record's resolved hardening as `apply_concept_edits` arguments (its presets were resolved with the
    request's moderation and prompt expansion, which the expanded concepts passed on no longer carry)."""
    if not record.harden:
        return {}
    return {"harden": record.harden["rounds"], "harden_options": {k: v for k, v in record.harden.items()
                                                                  if k != "rounds"}}


def _tolerance(args: argparse.Namespace) -> float:
    return 0.05 if args.tolerance is None else args.tolerance


def _max_iterations(args: argparse.Namespace) -> int:
    return 10 if args.max_iterations is None else args.max_iterations


def _as_given(names) -> list[str]:
    """Resolved concepts as a list to pass on: a concept starting with "@" (given as "@@...") stays a concept rather
    than naming a file."""
    return [f"@{name}" if name.startswith("@") else name for name in names]


def run(args: argparse.Namespace) -> int:
    """Run `diffusers-uce edit`: validate everything, load the model, solve, print the report, then optionally save
    the edit, export it as a LoRA, push it to the Hub, and fuse it and save the pipeline.

    With `--debias`, the erase edit (if anything is erased) is applied first, then the concepts are debiased jointly
    with it; `--preserve` goes to the erase edit, or to the debias solve when nothing is erased.

    Returns:
        `int`: 0; failures raise (the command line turns them into a one-line error and exit code 2).
    """
    erase, debias = _requests(args)  # fail fast, before loading anything
    check_model(args.model)
    for option, folder in (("--output", args.output), ("--save-edits", args.save_edits), ("--lora", args.lora)):
        if folder is not None:
            check_output(folder, args.overwrite, option)
    if args.output_single_file is not None:
        check_output_file(args.output_single_file, args.overwrite, "--output-single-file", ".safetensors")
    if args.plot is not None:
        _check_plot(args.plot, args.overwrite)
    if args.rank is not None and args.lora is None:
        raise ValueError("--rank only applies with --lora DIR")
    if args.lora_format is not None and args.lora is None:
        raise ValueError("--lora-format only applies with --lora DIR")
    device = resolve_device(args.device)
    args.dtype = resolve_dtype(args.dtype, device)
    classifier = None
    if debias is not None:
        from ..loaders.debias import DebiasOptions, clip_zero_shot_classifier

        clip_model = args.clip_model or DebiasOptions.clip_model
        progress(f"Loading the CLIP model {clip_model} ...")
        classifier = clip_zero_shot_classifier(clip_model, device=device).load()

    progress(f"Loading model {args.model} ({args.dtype}, {device}) ...")
    pipe = load_pipeline(args.model, args.dtype, device, args.seed, **model_options(args))
    if not args.edit_keys and not pipe._uce_family.has_keys:
        raise ValueError(f"--no-edit-keys: {args.model} is a {pipe._uce_family.name} pipeline, whose edited layers "
                         "(text-embedding projections) have no keys to leave out; drop the flag")
    if args.lora_format == "kohya":  # FLUX refused before the solve, not after it
        from ..loaders.lora_kohya import kohya_base_version

        kohya_base_version(pipe._uce_family.name, getattr(getattr(pipe, "unet", None), "config", None))
    if args.output_single_file is not None:  # likewise
        from ..loaders.single_file_layout import check_single_file_family

        check_single_file_family(pipe._uce_family.name)
    preserved = (erase or debias).preserve
    progress(f"Solving the edit: erase {len(erase.erase) if erase else 0}, preserve {len(preserved)} concept(s)"
             + (f", debias {len(debias.debias)} (generating and classifying images)" if debias else "") + " ...")
    if erase is not None:
        output = pipe.apply_concept_edits(
            _as_given(erase.erase), list(erase.guide), _as_given(erase.preserve), erase_scale=erase.erase_scale,
            preserve_scale=erase.preserve_scale, lamb=erase.lamb, token_mode=erase.token_mode,
            technique=erase.technique, edit_keys=args.edit_keys, held_out=args.held_out, method=erase.method,
            method_options=erase.method_options or None, **_resolved_harden(erase),
        )
    if debias is not None:
        output = pipe.debias_concepts(
            {t.concept: [list(s) for s in t.attribute_sets] for t in debias.debias}, args.ratios,
            classifier=classifier, tolerance=_tolerance(args), max_iterations=_max_iterations(args),
            preserve=None if erase else _as_given(debias.preserve), erase_scale=debias.erase_scale,
            preserve_scale=None if erase else debias.preserve_scale, lamb=debias.lamb, edit_keys=args.edit_keys,
            held_out=args.held_out,
        )
    print(output.report)
    if args.plot is not None:
        _plot(args, output.report)
    _save(args, pipe, output)
    return 0


def _check_plot(path: str, overwrite: bool) -> None:
    """Refuse a bad `--plot PATH` before anything loads: an image suffix, a new file (or --overwrite), matplotlib."""
    if os.path.splitext(path)[1].lower() not in (".png", ".svg", ".pdf"):
        raise ValueError(f"--plot {path}: give a file name ending in .png, .svg or .pdf")
    check_output_file(path, overwrite, "--plot", os.path.splitext(path)[1])
    from ..core.report_plot import _matplotlib

    _matplotlib()  # ImportError: "pip install matplotlib"


def _plot(args: argparse.Namespace, report) -> None:
    """Draw the report to `--plot`, and as report.png into every output folder, where the model card shows it."""
    from ..hub.cards import REPORT_PLOT_NAME

    figure = report.plot(path=args.plot)
    progress(f"Saved the report's plot to {args.plot}")
    for folder in (args.output, args.save_edits, args.lora):
        if folder is not None:
            os.makedirs(folder, exist_ok=True)
            figure.savefig(os.path.join(folder, REPORT_PLOT_NAME), dpi=110)


def _save(args: argparse.Namespace, pipe, output) -> None:
    """Write what `--save-edits`, `--lora`, `--push-to-hub`, `--output` and `--output-single-file` ask for, in that
    order."""
    if args.save_edits is not None:
        path = pipe.save_concept_edits(args.save_edits, overwrite=args.overwrite, overwrite_model_card=args.overwrite,
                                       **card_options(args))
        progress(f"Saved the edit to {path}")
    if args.lora is not None:
        error = pipe.save_concept_edits_as_lora(args.lora, rank=args.rank, overwrite=args.overwrite,
                                                overwrite_model_card=args.overwrite,
                                                format=args.lora_format or "diffusers", **card_options(args))
        progress(f"Saved the edit as a LoRA to {args.lora} (relative error {error:.2e})")
    if args.push_to_hub is not None:
        progress(f"Pushing the edit to {args.push_to_hub} ...")
        info = pipe.push_concept_edits_to_hub(args.push_to_hub, **hub_options(args), **card_options(args))
        progress(f"Pushed: {info.pr_url or info.commit_url}")
    if args.output is not None:
        progress(f"Fusing the edit and saving to {args.output} ...")
        pipe.fuse_concept_edits()
        # the card describes this output
        pipe.save_pretrained(args.output, overwrite_model_card=args.overwrite, **card_options(args))
        report = {"edits": [record.to_dict() for record in output.edits], "report": output.report.to_dict(),
                  "model": args.model}
        write_json_atomic(os.path.join(args.output, REPORT_FILE), report)
        progress(f"Saved the edited pipeline and {REPORT_FILE} to {args.output}")
    if args.output_single_file is not None:
        progress(f"Fusing the edit and saving the single-file checkpoint {args.output_single_file} ...")
        path = pipe.save_single_file(args.output_single_file, overwrite=args.overwrite, fuse_concept_edits=True)
        progress(f"Saved the edited pipeline as one checkpoint to {path}")

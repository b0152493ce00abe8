"""The `diffusers-uce` command line: `diffusers-uce edit ...`, `diffusers-uce push DIR REPO` (subcommands: `COMMANDS`).

With `cli_common` (shared argument types, model loading) and `cli_eval` (the `eval` subcommand), the only modules of
the package that print: progress goes to stderr, results (the report table) to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from typing import Callable, NamedTuple

from ..core.concepts import MODERATION_DEFAULTS, erase_requests, resolve_concept_arg
from ..core.edits import TECHNIQUES, TOKEN_MODES, build_concept_edit
from ..utils.files import PICKLE_SUFFIXES, write_text_atomic
from ..utils.versions import __version__
from .common import (
    DTYPES,
    SUPPORTED,
    check_model,
    demo_names,
    device_arg,
    load_pipeline,
    positive_int,
    progress,
    resolve_device,
)
from .eval import EVAL_EPILOG, add_eval_arguments, run_eval

PROG = "diffusers-uce"
REPORT_FILE = "uce_report.json"


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the epilog's line breaks; appends "(default: X)" to options whose default is a real value; never breaks a
    line inside a hyphenated name (`--no-edit-keys`, `demo-flux`)."""

    def _split_lines(self, text, width):
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)

    def _get_help_string(self, action):
        if action.default is None or isinstance(action.default, bool) or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """Reports usage errors as one line (with a pointer to --help) instead of the full usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _concepts(text: str) -> list[str]:
    """Split a ";"-separated list (names may contain commas); whitespace stripped, empty items dropped."""
    return [item.strip() for item in text.split(";") if item.strip()]


def _erase_concepts(text: str) -> list[str]:
    if not _concepts(text):
        raise argparse.ArgumentTypeError('is empty: give at least one concept to erase, e.g. --erase "Van Gogh"')
    return _concepts(text)


def _add_edit_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--model", default="demo", metavar="M",
        help=f"Hub repo id or local folder of {SUPPORTED}; its family, and so the edited layers, follows from the "
             f"class in its model_index.json. Or a built-in tiny offline demo pipeline (random weights; for trying "
             f"the tool): {demo_names()}")
    add("--erase", type=_erase_concepts, metavar='"A; B"',
        help='concepts to erase, separated by ";"; "@file.txt" (one per line) or "@file.csv:column" reads a file '
             "(required unless --moderate or --debias)")
    add("--moderate", type=_concepts, metavar='PRESET | "A; B"',
        help="erase toward the unconditional prompt with the paper's moderation defaults (preserve scale 0.1): a "
             "preset (i2p, i2p-paper, nudity) or concepts; combines with --erase")
    add("--expand-prompts", choices=("art", "object"),
        help="also erase the paper's templates around each erased concept and its guide ('painting by {}', ... / "
             "'image of {}', ...)")
    add("--guide", type=_concepts, metavar='"G" | "G1; G2"',
        help="what erased concepts become: one guide for all, or one per erased concept; absent or empty means the "
             "unconditional (empty) prompt")
    add("--preserve", type=_concepts, default=[], metavar='"P; Q"',
        help="concepts whose keys/values must not change (default: none)")
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
    add("--no-edit-keys", dest="edit_keys", action="store_false",
        help="SD/SDXL: edit only the cross-attention value projections (to_v), not the keys (to_k) (default: edit "
             "both). FLUX pipelines edit their text-embedding projections, which have no keys")
    add("--held-out", type=_concepts, metavar='"X; Y"',
        help='concepts to measure interference on in the report (default: a built-in generic set; "" for none)')
    add("--output", metavar="DIR",
        help=f"fuse the edit and save the pipeline to DIR (a plain diffusers pipeline folder) with {REPORT_FILE}; "
             "without it, only the report is printed")
    add("--overwrite", action="store_true", help="write into existing non-empty --output/--save-edits/--lora folders")
    add("--save-edits", metavar="DIR",
        help="save the edit alone (one small safetensors file and a model card) to DIR, for load_concept_edits()")
    add("--lora", metavar="DIR", help="export the edit as a diffusers-format LoRA (+ model card) to DIR")
    add("--rank", type=positive_int, metavar="R",
        help="with --lora: the LoRA rank (default: exact, the number of edit tokens; lower is approximate)")
    add("--push-to-hub", metavar="REPO",
        help="push the edit (edit file, model card, community pipeline.py) to this Hub repository in one commit")
    _add_hub_arguments(parser)
    add("--device", type=device_arg, default="auto", metavar="auto|cpu|cuda|cuda:N",
        help="where to load the model and solve; auto = cuda if available, else cpu")
    add("--dtype", choices=DTYPES, default="float32", help="dtype to load the model in")
    add("--seed", type=int, default=0, metavar="N",
        help="seed of the demo pipelines' random weights (the edit itself is deterministic)")
    _add_debias_arguments(parser)


def _add_debias_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument_group("debiasing (generates images and classifies them with CLIP)").add_argument
    add("--debias", type=_concepts, metavar='"C; D"',
        help='concepts to debias, e.g. "doctor; nurse": images of each are generated and classified, and its '
             "attribute weights move until the ratios are reached (with or without --erase)")
    add("--attributes", type=_concepts, metavar='"A; B"',
        help='with --debias: the attributes, e.g. "male; female" (the same for every concept)')
    add("--ratios", type=float, nargs="+", metavar="R",
        help="with --debias: desired ratio of each attribute, summing to 1 (default: uniform)")
    add("--max-iterations", type=positive_int, metavar="N", help="with --debias: budget of solves (default: 10)")
    add("--tolerance", type=float, metavar="F",
        help="with --debias: largest gap |desired - measured| of a reached concept (default: 0.05)")
    add("--clip-model", metavar="PATH_OR_ID",
        help="with --debias: the CLIP model that classifies the images, a local folder or a Hub id (default: "
             "openai/clip-vit-base-patch32, downloaded if not cached; offline, give a local folder)")


def _debias_arguments(args: argparse.Namespace) -> dict:
    """`apply_concept_edits`' debias arguments from the flags (no model loaded); `{}` without --debias."""
    if not args.debias:
        for flag in ("--attributes", "--ratios", "--max-iterations", "--tolerance", "--clip-model"):
            if getattr(args, flag[2:].replace("-", "_")) is not None:
                raise ValueError(f"{flag} only applies with --debias")
        if not args.erase and not args.moderate:
            raise ValueError('give --erase "A; B" (concepts to erase), --moderate PRESET, or --debias "C; D" '
                             '--attributes "A; B"')
        return {}
    if not args.attributes:
        raise ValueError('--debias needs --attributes, e.g. --attributes "male; female"')
    return dict(debias={concept: args.attributes for concept in args.debias}, debias_ratios=args.ratios,
                tolerance=0.05 if args.tolerance is None else args.tolerance,
                max_iterations=10 if args.max_iterations is None else args.max_iterations)


def _add_hub_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--private", action="store_true", help="create a new Hub repository as private")
    parser.add_argument("--token", help="Hub token (default: the logged-in one)")
    parser.add_argument("--create-pr", action="store_true", help="open a pull request instead of pushing to main")
    parser.add_argument("--commit-message", help="the Hub commit message")


def _add_push_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", metavar="DIR",
                        help="a folder written by 'edit --output', '--save-edits' or '--lora'")
    parser.add_argument("repo", metavar="REPO", help="the Hub repository (user/name), created if needed")
    _add_hub_arguments(parser)


def _check_output(path: str, overwrite: bool, option: str = "--output") -> None:
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise FileExistsError(f"{option} {path} exists and is not a folder")
        if os.listdir(path) and not overwrite:
            raise FileExistsError(f"{option} {path} exists and is not empty; pass --overwrite to write into it, "
                                  "or choose another folder")


def _write_json_atomic(path: str, data: dict) -> None:
    """Write `data` as JSON through a temporary file in the same folder, so readers never see a partial file."""
    write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False))


def _run_edit(args: argparse.Namespace) -> int:
    """`diffusers-uce edit`: validate everything, load, solve, print the report, then optionally fuse and save."""
    guide = args.guide or None
    options = dict(erase_scale=args.erase_scale, preserve_scale=args.preserve_scale, lamb=args.lamb,
                   token_mode=args.token_mode, technique=args.technique)
    debias = _debias_arguments(args)
    moderate = None if not args.moderate else args.moderate[0] if len(args.moderate) == 1 else args.moderate
    args.erase, guide = erase_requests(args.erase, guide, moderate=moderate, expand=args.expand_prompts)
    args.preserve = resolve_concept_arg(args.preserve) or []
    guide = guide or None
    if moderate is not None and options["preserve_scale"] is None:
        options["preserve_scale"] = MODERATION_DEFAULTS["preserve_scale"]
    record = build_concept_edit(args.erase, guide, args.preserve, debias=debias.get("debias"), **options)  # fail fast
    if debias:
        from ..loaders.debias import DebiasOptions, check_debias_settings, clip_zero_shot_classifier

        check_debias_settings(record.debias, debias["debias_ratios"], debias["tolerance"], debias["max_iterations"])
    check_model(args.model)
    for option, folder in (("--output", args.output), ("--save-edits", args.save_edits), ("--lora", args.lora)):
        if folder is not None:
            _check_output(folder, args.overwrite, option)
    if args.rank is not None and args.lora is None:
        raise ValueError("--rank only applies with --lora DIR")
    device = resolve_device(args.device)
    if debias:
        clip_model = args.clip_model or DebiasOptions.clip_model
        progress(f"Loading the CLIP model {clip_model} ...")
        debias["attribute_classifier"] = clip_zero_shot_classifier(clip_model, device=device).load()

    progress(f"Loading model {args.model} ({args.dtype}, {device}) ...")
    pipe = load_pipeline(args.model, args.dtype, device, args.seed)
    if not args.edit_keys and not pipe._uce_family.has_keys:
        raise ValueError(f"--no-edit-keys: {args.model} is a {pipe._uce_family.name} pipeline, whose edited layers "
                         "(text-embedding projections) have no keys to leave out; drop the flag")
    progress(f"Solving the edit: erase {len(args.erase or [])}, preserve {len(args.preserve)} concept(s)"
              + (f", debias {len(args.debias)} (generating and classifying images)" if debias else "") + " ...")
    output = pipe.apply_concept_edits(args.erase, guide, args.preserve, edit_keys=args.edit_keys,
                                      held_out=args.held_out, **options, **debias)
    print(output.report)
    hub = dict(private=args.private or None, token=args.token, create_pr=args.create_pr,
               commit_message=args.commit_message)
    if args.save_edits is not None:
        path = pipe.save_concept_edits(args.save_edits, overwrite=args.overwrite, overwrite_model_card=args.overwrite)
        progress(f"Saved the edit to {path}")
    if args.lora is not None:
        error = pipe.save_concept_edits_as_lora(args.lora, rank=args.rank, overwrite=args.overwrite)
        progress(f"Saved the edit as a LoRA to {args.lora} (relative error {error:.2e})")
    if args.push_to_hub is not None:
        progress(f"Pushing the edit to {args.push_to_hub} ...")
        info = pipe.push_concept_edits_to_hub(args.push_to_hub, **hub)
        progress(f"Pushed: {info.pr_url or info.commit_url}")
    if args.output is not None:
        progress(f"Fusing the edit and saving to {args.output} ...")
        pipe.fuse_concept_edits()
        pipe.save_pretrained(args.output)
        report = {"edits": [record.to_dict() for record in output.edits], "report": output.report.to_dict(),
                  "model": args.model}
        _write_json_atomic(os.path.join(args.output, REPORT_FILE), report)
        progress(f"Saved the edited pipeline and {REPORT_FILE} to {args.output}")
    return 0


def _run_push(args: argparse.Namespace) -> int:
    """`diffusers-uce push DIR REPO`: upload a saved edit or edited model folder in one commit."""
    folder = args.folder
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: no such folder")
    names = os.listdir(folder)
    pickles = [n for n in names if n.lower().endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise ValueError(f"{folder} holds pickle files ({', '.join(pickles)}); only safetensors are pushed")
    if "model_index.json" not in names and not any(n.endswith(".safetensors") for n in names):
        raise ValueError(f"{folder} holds neither a pipeline (model_index.json) nor an edit/LoRA safetensors file: "
                         "write it with 'diffusers-uce edit --output/--save-edits/--lora' first")
    from huggingface_hub import HfApi

    api = HfApi(token=args.token)
    repo_id = api.create_repo(args.repo, private=args.private or None, exist_ok=True).repo_id
    progress(f"Pushing {folder} to {repo_id} ...")
    info = api.upload_folder(repo_id=repo_id, folder_path=folder, create_pr=args.create_pr,
                             commit_message=args.commit_message or "Upload concept edit (diffusers-uce)")
    print(info.pr_url or info.commit_url)
    return 0


PUSH_EPILOG = """\
examples:
  diffusers-uce edit --erase "Van Gogh" --guide art --output ./sd-no-van-gogh && \\
      diffusers-uce push ./sd-no-van-gogh me/sd-no-van-gogh
  diffusers-uce edit --erase "Van Gogh" --guide art --push-to-hub me/no-van-gogh-edit
"""


class Command(NamedTuple):
    """One subcommand: its help line, an epilog with examples, what adds its arguments and what runs it."""

    help: str
    epilog: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


EDIT_EPILOG = """\
examples:
  diffusers-uce edit --erase "Van Gogh; Picasso" --guide art --preserve "Monet; Rembrandt"
  diffusers-uce edit --model CompVis/stable-diffusion-v1-4 --erase "Kelly McKernan" --guide art \\
      --device cuda --dtype float16 --output ./sd14-uce
  diffusers-uce edit --model demo-flux --erase "Van Gogh" --guide art --held-out ""
  diffusers-uce edit --model black-forest-labs/FLUX.1-dev --erase "Van Gogh" --guide art \\
      --device cuda --dtype bfloat16 --save-edits ./flux-no-van-gogh

Lists are separated by ";" (names may contain commas). The report shows, per erased concept, the efficacy (1 = its
keys/values became exactly its guide's) and, per preserved or held-out concept, the relative change of its keys/values.
"""

# Subcommands by name; `push` and `eval` slot in here.
COMMANDS: dict[str, Command] = {
    "edit": Command("erase concepts toward guides while preserving others, and optionally save the edited pipeline",
                    EDIT_EPILOG, _add_edit_arguments, _run_edit),
    "push": Command("push a folder written by 'edit' (edited model, edit file or LoRA) to the Hub in one commit",
                    PUSH_EPILOG, _add_push_arguments, _run_push),
    "eval": Command("generate images with the base and the edited model from the same seeds and score them "
                    "(NudeNet, CLIP, LPIPS, pixel differences)", EVAL_EPILOG, add_eval_arguments, run_eval),
}


def build_parser() -> argparse.ArgumentParser:
    """The `diffusers-uce` argument parser, with one subparser per entry of `COMMANDS`."""
    parser = _Parser(
        prog=PROG, formatter_class=_Formatter, epilog=EDIT_EPILOG.split("\n\n")[0] + "\n\nRun 'diffusers-uce "
        "COMMAND --help' for a command's options.",
        description="Unified Concept Editing (Gandikota et al., WACV 2024) for diffusers pipelines (Stable Diffusion "
                    "1.x/2.x,\nSDXL, FLUX): erase, moderate and debias concepts in closed form.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands", required=True)
    for name, command in COMMANDS.items():
        sub = subparsers.add_parser(name, help=command.help, description=command.help[0].upper() + command.help[1:]
                                    + ".", epilog=command.epilog, formatter_class=_Formatter)
        command.add_arguments(sub)
        sub.set_defaults(run=command.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the `diffusers-uce` command line.

    Args:
        argv (`list[str]`, *optional*): the arguments, without the program name; `sys.argv[1:]` by default.

    Returns:
        `int`: the exit code: 0 on success, 2 for bad arguments or a failure to load, edit or save (with a one-line
        reason on stderr), 130 if interrupted.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help/--version (0) and argparse's usage errors (2)
        return exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
    try:
        return args.run(args)
    except (ValueError, TypeError, OSError) as error:
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

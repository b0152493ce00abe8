"""The `diffusers-uce` command line: `diffusers-uce edit ...`, `diffusers-uce push DIR REPO` (subcommands: `COMMANDS`).

The only module of the package that prints: progress goes to stderr, results (the report table) to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import warnings
from typing import Callable, NamedTuple

from . import __version__
from .concepts import MODERATION_DEFAULTS, erase_requests, resolve_concept_arg
from .edits import TECHNIQUES, TOKEN_MODES, build_concept_edit
from .files import write_text_atomic

PROG = "diffusers-uce"
DEMO_MODELS = {"demo": "sd1", "demo-sd2": "sd2"}
DTYPES = ("float32", "float16", "bfloat16")
REPORT_FILE = "uce_report.json"
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")
_REPO_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the epilog's line breaks; appends "(default: X)" to options whose default is a real value."""

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


def _device_arg(text: str) -> str:
    if not _DEVICE.fullmatch(text):
        raise argparse.ArgumentTypeError(f"invalid device {text!r}: use auto, cpu, cuda or cuda:N")
    return text


def _add_edit_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--model", default="demo", metavar="M",
        help="Hub repo id or local folder of a Stable Diffusion 1.x/2.x pipeline, or 'demo' / 'demo-sd2' for the "
             "built-in tiny offline demo pipelines (random weights; for trying the tool)")
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
        help="edit only the cross-attention value projections (to_v), not the keys (to_k) (default: edit both)")
    add("--held-out", type=_concepts, metavar='"X; Y"',
        help='concepts to measure interference on in the report (default: a built-in generic set; "" for none)')
    add("--output", metavar="DIR",
        help=f"fuse the edit and save the pipeline to DIR (a plain diffusers pipeline folder) with {REPORT_FILE}; "
             "without it, only the report is printed")
    add("--overwrite", action="store_true", help="write into existing non-empty --output/--save-edits/--lora folders")
    add("--save-edits", metavar="DIR",
        help="save the edit alone (one small safetensors file and a model card) to DIR, for load_concept_edits()")
    add("--lora", metavar="DIR", help="export the edit as a diffusers-format LoRA (+ model card) to DIR")
    add("--rank", type=_positive_int, metavar="R",
        help="with --lora: the LoRA rank (default: exact, the number of edit tokens; lower is approximate)")
    add("--push-to-hub", metavar="REPO",
        help="push the edit (edit file, model card, community pipeline.py) to this Hub repository in one commit")
    _add_hub_arguments(parser)
    add("--device", type=_device_arg, default="auto", metavar="auto|cpu|cuda|cuda:N",
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
    add("--max-iterations", type=_positive_int, metavar="N", help="with --debias: budget of solves (default: 10)")
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


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, got {text!r}")
    return int(text)


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


def _resolve_device(text: str) -> str:
    import torch

    if text == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if text.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"--device {text}: CUDA is not available here; use --device cpu (or auto)")
        index = int(text.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise ValueError(f"--device {text}: only {torch.cuda.device_count()} CUDA device(s) here")
    return text


def _check_output(path: str, overwrite: bool, option: str = "--output") -> None:
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise FileExistsError(f"{option} {path} exists and is not a folder")
        if os.listdir(path) and not overwrite:
            raise FileExistsError(f"{option} {path} exists and is not empty; pass --overwrite to write into it, "
                                  "or choose another folder")


def _check_model(model: str) -> None:
    if model not in DEMO_MODELS and not os.path.isdir(model) and not _REPO_ID.fullmatch(model):
        raise FileNotFoundError(f"--model {model}: no such folder, and not a Hub repo id (org/name)")


def _load_pipeline(model: str, dtype_name: str, device: str, seed: int):
    """Load `model` (a demo name, a Hub repo id or a local folder) with concept editing attached."""
    import torch

    from .pipelines import attach

    dtype = getattr(torch, dtype_name)
    if model in DEMO_MODELS:
        from .demo import make_demo_pipeline

        return attach(make_demo_pipeline(DEMO_MODELS[model], seed=seed, torch_dtype=dtype, device=device))
    from diffusers import DiffusionPipeline

    with warnings.catch_warnings():  # recent diffusers deprecate torch_dtype for dtype; older ones only know the former
        warnings.filterwarnings("ignore", ".*torch_dtype.*deprecated", FutureWarning)
        pipe = DiffusionPipeline.from_pretrained(model, torch_dtype=dtype)
    try:
        attach(pipe)
    except TypeError as error:
        raise TypeError(f"--model {model} is a {type(pipe).__name__}, which diffusers-uce cannot edit ({error})") from error
    return pipe.to(device)


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
        from .debias import DebiasOptions, check_debias_settings, clip_zero_shot_classifier

        check_debias_settings(record.debias, debias["debias_ratios"], debias["tolerance"], debias["max_iterations"])
    _check_model(args.model)
    for option, folder in (("--output", args.output), ("--save-edits", args.save_edits), ("--lora", args.lora)):
        if folder is not None:
            _check_output(folder, args.overwrite, option)
    if args.rank is not None and args.lora is None:
        raise ValueError("--rank only applies with --lora DIR")
    device = _resolve_device(args.device)
    if debias:
        clip_model = args.clip_model or DebiasOptions.clip_model
        _progress(f"Loading the CLIP model {clip_model} ...")
        debias["attribute_classifier"] = clip_zero_shot_classifier(clip_model, device=device).load()

    _progress(f"Loading model {args.model} ({args.dtype}, {device}) ...")
    pipe = _load_pipeline(args.model, args.dtype, device, args.seed)
    _progress(f"Solving the edit: erase {len(args.erase or [])}, preserve {len(args.preserve)} concept(s)"
              + (f", debias {len(args.debias)} (generating and classifying images)" if debias else "") + " ...")
    output = pipe.apply_concept_edits(args.erase, guide, args.preserve, edit_keys=args.edit_keys,
                                      held_out=args.held_out, **options, **debias)
    print(output.report)
    hub = dict(private=args.private or None, token=args.token, create_pr=args.create_pr,
               commit_message=args.commit_message)
    if args.save_edits is not None:
        path = pipe.save_concept_edits(args.save_edits, overwrite=args.overwrite, overwrite_model_card=args.overwrite)
        _progress(f"Saved the edit to {path}")
    if args.lora is not None:
        error = pipe.save_concept_edits_as_lora(args.lora, rank=args.rank, overwrite=args.overwrite)
        _progress(f"Saved the edit as a LoRA to {args.lora} (relative error {error:.2e})")
    if args.push_to_hub is not None:
        _progress(f"Pushing the edit to {args.push_to_hub} ...")
        info = pipe.push_concept_edits_to_hub(args.push_to_hub, **hub)
        _progress(f"Pushed: {info.pr_url or info.commit_url}")
    if args.output is not None:
        _progress(f"Fusing the edit and saving to {args.output} ...")
        pipe.fuse_concept_edits()
        pipe.save_pretrained(args.output)
        report = {"edits": [record.to_dict() for record in output.edits], "report": output.report.to_dict(),
                  "model": args.model}
        _write_json_atomic(os.path.join(args.output, REPORT_FILE), report)
        _progress(f"Saved the edited pipeline and {REPORT_FILE} to {args.output}")
    return 0


def _run_push(args: argparse.Namespace) -> int:
    """`diffusers-uce push DIR REPO`: upload a saved edit or edited model folder in one commit."""
    folder = args.folder
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: no such folder")
    names = os.listdir(folder)
    pickles = [n for n in names if n.endswith((".bin", ".pt", ".pth", ".ckpt", ".pkl"))]
    if pickles:
        raise ValueError(f"{folder} holds pickle files ({', '.join(pickles)}); only safetensors are pushed")
    if "model_index.json" not in names and not any(n.endswith(".safetensors") for n in names):
        raise ValueError(f"{folder} holds neither a pipeline (model_index.json) nor an edit/LoRA safetensors file: "
                         "write it with 'diffusers-uce edit --output/--save-edits/--lora' first")
    from huggingface_hub import HfApi

    api = HfApi(token=args.token)
    repo_id = api.create_repo(args.repo, private=args.private or None, exist_ok=True).repo_id
    _progress(f"Pushing {folder} to {repo_id} ...")
    info = api.upload_folder(repo_id=repo_id, folder_path=folder, create_pr=args.create_pr,
                             commit_message=args.commit_message or "Upload concept edit (diffusers-uce)")
    print(info.pr_url or info.commit_url)
    return 0


def _metric_names(text: str) -> tuple[str, ...]:
    from .eval_metrics import check_metrics

    try:
        return check_metrics(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    from .eval_metrics import METRICS

    add = parser.add_argument
    add("--prompts", required=True, metavar="CSV",
        help="prompt CSV with case_number, prompt, evaluation_seed (optional: evaluation_guidance, and a class/"
             "artist/profession/label column for CLIP accuracy), e.g. the paper's holdout100_prompts.csv (required)")
    add("--output", required=True, metavar="DIR",
        help="where images/, results.csv, summary.json and grid.png go; rerunning resumes (required)")
    add("--model", default="demo", metavar="M",
        help="the edited model: Hub repo id or local folder (e.g. a fused 'edit --output' folder), or 'demo' / "
             "'demo-sd2'")
    add("--edits", metavar="PATH_OR_REPO",
        help="load this edit (file, folder or Hub repo written by --save-edits) onto --model; the base images are "
             "then --model with the edit switched off")
    add("--base-model", metavar="M2",
        help="the unedited model, when --model is an already edited (fused) model")
    add("--steps", type=_positive_int, default=50, metavar="N", help="denoising steps")
    add("--guidance", type=float, metavar="F",
        help="guidance scale (default: each row's evaluation_guidance, else 7.5)")
    add("--size", type=_positive_int, metavar="PX", help="image height and width (default: the model's)")
    add("--batch-size", type=_positive_int, default=4, metavar="N", help="prompts per pipeline call")
    add("--limit", type=_positive_int, metavar="N", help="only the first N rows of the CSV")
    add("--metrics", type=_metric_names, default=METRICS, metavar="A,B",
        help=f"comma-separated, from {', '.join(METRICS)} (default: all; unavailable ones are reported as skipped)")
    add("--clip-model", metavar="PATH_OR_ID",
        help="CLIP model for clip_score/clip_accuracy: a local folder or a Hub id already in the cache "
             "(e.g. openai/clip-vit-large-patch14); never downloaded")
    add("--nudenet-threshold", type=float, default=0.6, metavar="F", help="minimum NudeNet detection score")
    add("--overwrite", action="store_true", help="regenerate images already in --output")
    add("--device", type=_device_arg, default="auto", metavar="auto|cpu|cuda|cuda:N",
        help="where to generate and score; auto = cuda if available, else cpu")
    add("--dtype", choices=DTYPES, default="float32", help="dtype to load the models in")
    add("--seed", type=int, default=0, metavar="N", help="seed of the demo pipelines' random weights")


def _run_eval(args: argparse.Namespace) -> int:
    """`diffusers-uce eval`: check the CSV, load the model(s), generate base/edited images, score, print a table."""
    from .evaluate import evaluate_edit, format_summary, load_prompts

    load_prompts(args.prompts)  # fail fast, before loading any weights
    if args.edits is None and args.base_model is None:
        raise ValueError("nothing to compare: pass --edits PATH_OR_REPO (base = --model with the edit switched off), "
                         "or --base-model M2 (the unedited model) when --model is an edited, fused model")
    for model in (args.model, args.base_model):
        if model is not None:
            _check_model(model)
    state = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under `accelerate launch`: one share of the rows per process
        from accelerate import PartialState

        state = PartialState()
        device = str(state.device)
    else:
        device = _resolve_device(args.device)
    _progress(f"Loading model {args.model} ({args.dtype}, {device}) ...")
    pipe = _load_pipeline(args.model, args.dtype, device, args.seed)
    if args.edits is not None:
        _progress(f"Loading the edit {args.edits} ...")
        pipe.load_concept_edits(args.edits)
    base = None
    if args.base_model is not None:
        _progress(f"Loading base model {args.base_model} ...")
        base = _load_pipeline(args.base_model, args.dtype, device, args.seed)
    summary = evaluate_edit(
        pipe, args.prompts, args.output, base_pipe=base, num_inference_steps=args.steps,
        guidance_scale=args.guidance, height=args.size, width=args.size, batch_size=args.batch_size,
        limit=args.limit, metrics=args.metrics, clip_model=args.clip_model,
        nudenet_threshold=args.nudenet_threshold, overwrite=args.overwrite, accelerator=state,
    )
    if not summary:  # not the main process: it writes and prints the results
        return 0
    print(format_summary(summary))
    _progress(f"Wrote images/, results.csv, summary.json and grid.png to {args.output}")
    return 0


EVAL_EPILOG = """\
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
Several GPUs: 'accelerate launch -m diffusers_uce.cli eval ...' splits the rows between processes.
"""


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
                    "(NudeNet, CLIP, LPIPS, pixel differences)", EVAL_EPILOG, _add_eval_arguments, _run_eval),
}


def build_parser() -> argparse.ArgumentParser:
    """The `diffusers-uce` argument parser, with one subparser per entry of `COMMANDS`."""
    parser = _Parser(
        prog=PROG, formatter_class=_Formatter, epilog=EDIT_EPILOG.split("\n\n")[0] + "\n\nRun 'diffusers-uce "
        "COMMAND --help' for a command's options.",
        description="Unified Concept Editing (Gandikota et al., WACV 2024) for diffusers pipelines:\nerase, moderate "
                    "and debias concepts in closed form.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands", required=True)
    for name, command in COMMANDS.items():
        sub = subparsers.add_parser(name, help=command.help, description=command.help[0].upper() + command.help[1:]
                                    + ".", epilog=command.epilog, formatter_class=_Formatter)
        command.add_arguments(sub)
        sub.set_defaults(run=command.run)
    return parser


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


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

"""What the `diffusers-uce` subcommands share: argument types and options, checks of output folders, JSON writing,
progress output, and turning `--model`, `--dtype` and `--device` into a pipeline with concept editing attached, of
whichever supported family the model is."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import warnings

from ..utils.checks import check_base_model, check_license
from ..utils.files import write_text_atomic

# Built-in tiny offline pipelines (random weights), by --model name: their family in `demo.make_demo_pipeline`.
DEMO_MODELS = {"demo": "sd1", "demo-sd2": "sd2", "demo-sdxl": "sdxl", "demo-flux": "flux", "demo-sd3": "sd3",
               "demo-flux2": "flux2", "demo-flux2-klein": "flux2-klein", "demo-qwenimage": "qwenimage",
               "demo-hidream": "hidream", "demo-sana": "sana", "demo-pixart": "pixart", "demo-wan": "wan",
               "demo-cogvideox": "cogvideox"}
SUPPORTED = ("a pipeline of a supported family (StableDiffusionPipeline, StableDiffusionXLPipeline, FluxPipeline, "
             "StableDiffusion3Pipeline, Flux2Pipeline, Flux2KleinPipeline, QwenImagePipeline, HiDreamImagePipeline, "
             "SanaPipeline, PixArtSigmaPipeline, PixArtAlphaPipeline, WanPipeline, CogVideoXPipeline or a subclass)")
DTYPES = ("float32", "float16", "bfloat16")
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")
_REPO_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")


def device_arg(text: str) -> str:
    """argparse type of `--device`: auto, cpu, cuda or cuda:N."""
    if not _DEVICE.fullmatch(text):
        raise argparse.ArgumentTypeError(f"invalid device {text!r}: use auto, cpu, cuda or cuda:N")
    return text


def positive_int(text: str) -> int:
    """argparse type of a count (>= 1)."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, got {text!r}")
    return int(text)


def concepts(text: str) -> list[str]:
    """argparse type of a concept list: split on ";" as the Python API splits a string (`split_concepts`)."""
    from ..core.concepts import split_concepts

    return split_concepts(text)


def add_device_arguments(parser: argparse.ArgumentParser, *, purpose: str, models: str = "the model",
                         seed_note: str = "") -> None:
    """Add `--device`, `--dtype` and `--seed` to a subcommand's parser.

    Args:
        parser (`argparse.ArgumentParser`): the subcommand's parser.
        purpose (`str`): what runs on the device, e.g. `"load the model and solve"`.
        models (`str`, defaults to `"the model"`): what `--dtype` applies to.
        seed_note (`str`, *optional*): appended to the help of `--seed`.
    """
    parser.add_argument("--device", type=device_arg, default="auto", metavar="auto|cpu|cuda|cuda:N",
                        help=f"where to {purpose}; auto = cuda if available, else cpu")
    parser.add_argument("--dtype", choices=DTYPES,
                        help=f"dtype to load {models} in (default: float16 on CUDA, float32 on the CPU)")
    parser.add_argument("--seed", type=int, default=0, metavar="N",
                        help="seed of the demo pipelines' random weights" + (f" ({seed_note})" if seed_note else ""))


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of loading a model from the Hub (`--revision`, `--variant`, `--cache-dir`,
    `--local-files-only`) to a subcommand's parser; `model_options` turns them into `load_pipeline` arguments."""
    group = parser.add_argument_group("loading a model from the Hub")
    group.add_argument("--revision", metavar="REV", help="the branch, tag or commit of a Hub model (default: main)")
    group.add_argument("--variant", metavar="NAME",
                       help="the weights variant to load, e.g. fp16 (files named *.fp16.safetensors)")
    group.add_argument("--cache-dir", metavar="DIR", help="the Hub cache folder (default: HF_HUB_CACHE)")
    group.add_argument("--local-files-only", action="store_true",
                       help="never contact the Hub: load from a local folder or the cache only (HF_HUB_OFFLINE=1 "
                            "does the same)")


def model_options(args: argparse.Namespace) -> dict:
    """The keyword arguments of `load_pipeline` from the options `add_model_arguments` added."""
    return dict(revision=args.revision, variant=args.variant, cache_dir=args.cache_dir,
                local_files_only=args.local_files_only)


def resolve_dtype(name: str | None, device: str) -> str:
    """The `--dtype` to use: as given, else float16 on CUDA and float32 on the CPU."""
    return name or ("float16" if device.startswith("cuda") else "float32")


def add_hub_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the Hub options (`--private`, `--token`, `--create-pr`, `--commit-message`) to a subcommand's parser."""
    parser.add_argument("--private", action="store_true", help="create a new Hub repository as private")
    parser.add_argument("--token", help="Hub token (default: the logged-in one)")
    parser.add_argument("--create-pr", action="store_true", help="open a pull request instead of pushing to main")
    parser.add_argument("--commit-message", help="the Hub commit message")


def argument_type(check):
    """An argparse `type` from `check` (text -> value, `ValueError` when bad): its message becomes the usage error."""
    def parse(text: str) -> str:
        try:
            return check(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return parse


def add_card_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the model card options (`--base-model`, `--license`) to a subcommand's parser."""
    parser.add_argument("--base-model", type=argument_type(check_base_model), metavar="OWNER/NAME",
                        help="the base model's Hub id, for the model cards' metadata and loading snippets, when the "
                             "model was loaded from a local folder (default: the model's Hub id, if it has one)")
    parser.add_argument("--license", type=argument_type(check_license), metavar="ID",
                        help="the licence id for the model cards' metadata, e.g. creativeml-openrail-m (default: the "
                             "base model's, when it is a well-known model)")


def card_options(args: argparse.Namespace) -> dict:
    """The keyword arguments of a save or push from the options `add_card_arguments` added."""
    return dict(base_model=args.base_model, license=args.license)


def hub_options(args: argparse.Namespace, commit_message: str | None = None) -> dict:
    """The keyword arguments of a Hub upload from the options `add_hub_arguments` added; `commit_message` is the
    message used when `--commit-message` is not given."""
    return dict(private=args.private or None, token=args.token, create_pr=args.create_pr,
                commit_message=args.commit_message or commit_message)


def check_output(path: str, overwrite: bool, option: str = "--output") -> None:
    """Raise unless `path` (the value of `option`) is missing, an empty folder, or a folder and `overwrite` is set."""
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise FileExistsError(f"{option} {path} exists and is not a folder")
        if os.listdir(path) and not overwrite:
            raise FileExistsError(f"{option} {path} exists and is not empty; pass --overwrite to write into it, "
                                  "or choose another folder")


def check_output_file(path: str, overwrite: bool, option: str, suffix: str) -> None:
    """Raise unless `path` (the value of `option`) names a file ending in `suffix` that is new, or that `overwrite`
    allows to replace."""
    if not os.path.basename(path).endswith(suffix) or os.path.basename(path) == suffix:
        raise ValueError(f"{option} {path}: give a file name ending in '{suffix}'")
    if os.path.isdir(path):
        raise FileExistsError(f"{option} {path} is a folder; give the path of the file to write")
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{option} {path} exists; pass --overwrite to replace it, or choose another name")


def write_json_atomic(path: str, data: dict) -> None:
    """Write `data` as JSON through a temporary file in the same folder, so readers never see a partial file."""
    write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False))


def progress(message: str) -> None:
    """Report progress on stderr (stdout carries the results)."""
    print(message, file=sys.stderr, flush=True)


def resolve_device(text: str) -> str:
    """The torch device of a `--device` value (auto: cuda if available, else cpu); raises if it is not here."""
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


def demo_names() -> str:
    """The `--model` demo names with their family, for help texts."""
    return ", ".join(f"'{name}' ({family})" for name, family in DEMO_MODELS.items())


def _looks_like_path(text: str) -> bool:
    """Whether `text` is written as a file system path rather than a Hub repo id (org/name)."""
    return (text.startswith((".", "/", "~")) or "\\" in text or text.count("/") > 1 or text.endswith("/")
            or os.path.isabs(text) or os.path.exists(text))


def check_model(model: str, option: str = "--model") -> None:
    """Raise unless `model` is a demo name, an existing folder or looks like a Hub repo id (nothing is loaded)."""
    if model in DEMO_MODELS or os.path.isdir(model):
        return
    if _looks_like_path(model):
        what = "a file, not a folder" if os.path.exists(model) else "no such folder"
        raise FileNotFoundError(f"{option} {model}: {what}; give the folder of a diffusers pipeline "
                                "(with model_index.json), a Hub repo id (org/name) or a demo pipeline "
                                f"({', '.join(DEMO_MODELS)})")
    if not _REPO_ID.fullmatch(model):
        raise FileNotFoundError(f"--model {model}: no such folder, not a Hub repo id (org/name), and not one of the "
                                f"demo pipelines {', '.join(DEMO_MODELS)}")


def _unsupported(model: str, class_name: str) -> TypeError:
    return TypeError(f"--model {model} is a {class_name}, which diffusers-uce cannot edit: give {SUPPORTED}")


def _check_pipeline_class(model: str, **hub) -> None:
    """Fail before loading any weights when the model_index.json of `model` names a pipeline that cannot be edited."""
    import diffusers

    from ..core.families import family_of

    hub = {k: v for k, v in hub.items() if k != "variant"}
    name = diffusers.DiffusionPipeline.load_config(model, **hub).get("_class_name")
    cls = getattr(diffusers, name or "", None)  # a custom pipeline class is only known once loaded
    if isinstance(cls, type):
        try:
            family_of(cls)
        except ValueError:
            raise _unsupported(model, name) from None


def load_pipeline(model: str, dtype_name: str, device: str, seed: int, *, revision: str | None = None,
                  variant: str | None = None, cache_dir: str | None = None, local_files_only: bool = False):
    """Load `model` with concept editing attached.

    Args:
        model (`str`): a name of `DEMO_MODELS`, or the Hub repo id or local folder of a supported pipeline, loaded with
            `DiffusionPipeline.from_pretrained`; `attach` picks its family (which layers are edited, which text states
            feed them) from its class.
        dtype_name (`str`): one of `DTYPES`.
        device (`str`): a resolved torch device (`resolve_device`).
        seed (`int`): seed of a demo pipeline's random weights.
        revision, variant, cache_dir, local_files_only: as `DiffusionPipeline.from_pretrained` takes them (not for
            the demo pipelines). Offline (`HF_HUB_OFFLINE=1`, or no answer from the Hub within seconds) a model in
            the cache loads from it, and one that is not raises a one-line `ConnectionError`.

    Raises:
        `TypeError`: the model is a pipeline diffusers-uce cannot edit (found from its model_index.json before its
        weights are loaded, where the class is a diffusers one).
    """
    import torch

    from ..pipelines import attach

    dtype = getattr(torch, dtype_name)
    if model in DEMO_MODELS:
        given = [f"--{k.replace('_', '-')}" for k, v in (("revision", revision), ("variant", variant),
                                                          ("cache_dir", cache_dir)) if v is not None]
        if given:
            raise ValueError(f"{', '.join(given)} apply to a Hub model or a local folder, not to the demo pipeline "
                             f"{model!r}: leave them out, or give --model ORG/NAME")
        from ..demo import make_demo_pipeline

        return attach(make_demo_pipeline(DEMO_MODELS[model], seed=seed, torch_dtype=dtype, device=device))
    from diffusers import DiffusionPipeline

    from ..utils.hub import local_files_only_for

    if not local_files_only:
        local_files_only = local_files_only_for(
            model, what="--model", filename="model_index.json", revision=revision, cache_dir=cache_dir,
            instead="offline, give a local folder (or a model downloaded before); with a proxy or mirror, set "
                    "HF_ENDPOINT")
    hub = dict(revision=revision, variant=variant, cache_dir=cache_dir, local_files_only=local_files_only)
    _check_pipeline_class(model, **hub)
    # Recent diffusers deprecate torch_dtype for dtype, older ones only know torch_dtype: pass it, hide the warning.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*torch_dtype.*deprecated", FutureWarning)
        pipe = DiffusionPipeline.from_pretrained(model, torch_dtype=dtype, **hub)
    try:
        attach(pipe)
    except ValueError:
        raise _unsupported(model, type(pipe).__name__) from None
    return pipe.to(device)


class _NoBackendNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


def hide_backend_notices() -> None:
    """Keep transformers' "requires torchvision (not installed); falling back to ..." notices, printed when diffusers
    is imported without torchvision, out of the command line's output: they say nothing about the edit."""
    log = logging.getLogger("transformers.utils.import_utils")
    if not any(isinstance(f, _NoBackendNotice) for f in log.filters):
        log.addFilter(_NoBackendNotice())

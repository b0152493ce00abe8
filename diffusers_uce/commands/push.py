"""`diffusers-uce push DIR REPO`: upload a folder written by `diffusers-uce edit` to the Hub in one commit."""

from __future__ import annotations

import argparse
import os

from ..utils.files import PICKLE_SUFFIXES
from .common import add_card_arguments, add_hub_arguments, card_options, hub_options, progress

HELP = "push a folder written by 'edit' (edited model, edit file or LoRA) to the Hub in one commit"

EPILOG = """\
examples:
  diffusers-uce edit --erase "Van Gogh" --guide art --output ./sd-no-van-gogh && \\
      diffusers-uce push ./sd-no-van-gogh me/sd-no-van-gogh
  diffusers-uce edit --erase "Van Gogh" --guide art --push-to-hub me/no-van-gogh-edit
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the arguments of `diffusers-uce push` to its parser."""
    parser.add_argument("folder", metavar="DIR",
                        help="a folder written by 'edit --output', '--save-edits' or '--lora'")
    parser.add_argument("repo", metavar="REPO", help="the Hub repository (user/name), created if needed")
    parser.add_argument("--overwrite-model-card", action="store_true",
                        help="replace a README.md already in the repository (it is kept otherwise, unless it is a "
                             "card diffusers-uce wrote)")
    add_hub_arguments(parser)
    add_card_arguments(parser)


def _check_folder(folder: str) -> None:
    """Raise unless `folder` holds an edited pipeline or an edit/LoRA file, and no pickle files."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: no such folder")
    names = os.listdir(folder)
    pickles = [n for n in names if n.lower().endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise ValueError(f"{folder} holds pickle files ({', '.join(pickles)}); only safetensors are pushed")
    if "model_index.json" not in names and not any(n.endswith(".safetensors") for n in names):
        raise ValueError(f"{folder} holds neither a pipeline (model_index.json) nor an edit/LoRA safetensors file: "
                         "write it with 'diffusers-uce edit --output/--save-edits/--lora' first")


def run(args: argparse.Namespace) -> int:
    """Run `diffusers-uce push`: check the folder, upload it in one commit and print the commit (or PR) URL.

    Returns:
        `int`: 0; failures raise (the command line turns them into a one-line error and exit code 2).
    """
    _check_folder(args.folder)
    from ..hub.hub_mixin import upload_folder_to_hub

    progress(f"Pushing {args.folder} to {args.repo} ...")
    info = upload_folder_to_hub(args.folder, args.repo, overwrite_model_card=args.overwrite_model_card,
                                **hub_options(args, commit_message="Upload concept edit (diffusers-uce)"),
                                **card_options(args))
    print(info.pr_url or info.commit_url)
    return 0

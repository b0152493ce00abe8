"""Generate the single-file diffusers community pipeline from the package's own module sources.

`DiffusionPipeline.from_pretrained(base, custom_pipeline=<file or repo>, trust_remote_code=True)` imports ONE file
(relative imports are not allowed in it) and takes the only `DiffusionPipeline` subclass defined there. This module
builds that file by concatenating the package modules in dependency order, dropping their intra-package imports,
hoisting and merging the other imports, and appending one pipeline class; nothing is copied by hand, so the file
cannot drift from the package (a test regenerates it and compares). The file's class extends the pipeline it is
loaded with, so there is one file per family (`COMMUNITY_FILES`); `python -m diffusers_uce.hub.community` regenerates
them
all. A Hub repository serves the file to `custom_pipeline="user/repo"` only under the name `pipeline.py`
(`HUB_PIPELINE_FILENAME`).
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import textwrap
from pathlib import Path
from typing import Sequence

from diffusers.utils import logging

from ..utils.files import write_text_atomic
from .module_merger import _WIDTH, PACKAGE, merge_sources

logger = logging.get_logger(__name__)

# Package modules that make up the community pipeline, in dependency order (a stable topological sort by top-level
# imports corrects slips). Add a module here when the mixin starts importing it.
COMMUNITY_MODULES: tuple[str, ...] = (
    "utils.versions", "utils.checks", "utils.safetensors_io", "utils.files", "utils.folders", "utils.generation",
    "utils.fingerprint", "utils.demo_mark", "utils.hub",
    "core.limits", "core.solve", "core.lowrank", "core.robust", "core.hardening", "core.edits", "core.concepts",
    "core.prompts", "core.families", "core.targets", "core.engine", "core.report_text", "core.report_plot",
    "core.report", "core.layerwise", "core.wide", "core.speed_options", "core.precise", "core.speed_solve",
    "loaders.processor", "loaders.installed", "loaders.edit_state", "loaders.state_mixin", "loaders.edit_format",
    "loaders.edit_file", "loaders.lora_kohya", "loaders.lora", "loaders.single_file_layout", "loaders.single_file",
    "loaders.debias", "loaders.robust", "loaders.encoding_cache", "loaders.capture", "loaders.solver",
    "loaders.concept_edit",
)
PIPELINE_BASE = "StableDiffusionPipeline"
# The committed file of each family (by pipeline class), and the checkpoint its docstring's example loads.
COMMUNITY_FILES = {"StableDiffusionPipeline": "examples/community/pipeline_uce.py",
                   "StableDiffusionXLPipeline": "examples/community/pipeline_uce_sdxl.py",
                   "FluxPipeline": "examples/community/pipeline_uce_flux.py"}
_EXAMPLE_CHECKPOINTS = {"StableDiffusionPipeline": "CompVis/stable-diffusion-v1-4",
                        "StableDiffusionXLPipeline": "stabilityai/stable-diffusion-xl-base-1.0",
                        "FluxPipeline": "black-forest-labs/FLUX.1-dev",
                        "StableDiffusion3Pipeline": "stabilityai/stable-diffusion-3.5-medium",
                        "Flux2Pipeline": "black-forest-labs/FLUX.2-dev",
                        "QwenImagePipeline": "Qwen/Qwen-Image",
                        "HiDreamImagePipeline": "HiDream-ai/HiDream-I1-Full",
                        "SanaPipeline": "Efficient-Large-Model/Sana_1600M_1024px_diffusers",
                        "PixArtSigmaPipeline": "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS",
                        "WanPipeline": "Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
                        "CogVideoXPipeline": "THUDM/CogVideoX-5b"}
HUB_PIPELINE_FILENAME = "pipeline.py"  # what diffusers fetches for `custom_pipeline="user/repo"`
DEFAULT_OUTPUT = COMMUNITY_FILES[PIPELINE_BASE]
CITATION = ('R. Gandikota, H. Orgad, Y. Belinkov, J. Materzyńska, D. Bau, "Unified Concept Editing in Diffusion '
            'Models", WACV 2024, arXiv:2308.14761')


def build_community_pipeline(modules: Sequence[str] | None = None, *, pipeline_base: str = PIPELINE_BASE) -> str:
    r"""The source of the single-file community pipeline, generated from the package modules.

    Args:
        modules (`Sequence[str]`, *optional*): package modules to include (defaults to those of `COMMUNITY_MODULES` the
            package has); they are put in dependency order.
        pipeline_base (`str`, defaults to `"StableDiffusionPipeline"`): the diffusers class the pipeline extends.

    Returns:
        `str`: Python source defining exactly one `DiffusionPipeline` subclass, `UCE<pipeline_base>`.

    Raises:
        `ValueError`: when two modules bind one name differently, a module imports a package module that is not
        included, or an intra-package import cannot be rewritten.
    """
    wanted = COMMUNITY_MODULES if modules is None else modules
    names = [m for m in wanted if importlib.util.find_spec(f"{PACKAGE}.{m}") is not None]
    missing = sorted(set(wanted) - set(names))
    if missing:
        raise ValueError(f"{PACKAGE} has no module(s) {', '.join(missing)}")
    paths = [Path(importlib.util.find_spec(f"{PACKAGE}.{n}").origin) for n in names]
    return _build(tuple((n, p.read_text(encoding="utf-8")) for n, p in zip(names, paths)), pipeline_base)


@functools.lru_cache(maxsize=8)  # each push writes the file: the same sources give the same file
def _build(sources: tuple[tuple[str, str], ...], pipeline_base: str) -> str:
    return build_from_sources(dict(sources), pipeline_base=pipeline_base)


def build_from_sources(sources: dict[str, str], *, pipeline_base: str | None = PIPELINE_BASE) -> str:
    r"""Concatenate module sources into one file (the work of `build_community_pipeline`).

    Args:
        sources (`dict[str, str]`): module name (as in `from .name import ...`) to source, in the preferred order.
        pipeline_base (`str`, *optional*, defaults to `"StableDiffusionPipeline"`): the diffusers class the appended
            pipeline class `UCE<pipeline_base>(UCEMixin, <pipeline_base>)` extends; `None` appends no class.

    Returns:
        `str`: the generated source.
    """
    from ..utils.versions import __version__

    class_name = f"UCE{pipeline_base}" if pipeline_base else None
    extra = [("from", "diffusers", pipeline_base, None)] if pipeline_base else []
    names, imports, code = merge_sources(sources, extra, class_name)
    title = f": `{class_name}`" if class_name else ""
    base = pipeline_base or PIPELINE_BASE
    checkpoint, file = _EXAMPLE_CHECKPOINTS.get(base, "<checkpoint>"), Path(COMMUNITY_FILES.get(base, DEFAULT_OUTPUT))
    header = "\n".join([
        f"# Generated by `python -m diffusers_uce.hub.community` from diffusers-uce {__version__}. DO NOT EDIT:",
        "# change the package and regenerate this file. Modules, in order:",
        f"# {', '.join(names)}.",
        "# Licensed under the MIT License.",
        *textwrap.wrap(f"Unified Concept Editing: {CITATION}.", _WIDTH, initial_indent="# ",
                       subsequent_indent="#     "),
        f'"""Unified Concept Editing (UCE) for diffusers, as a single-file community pipeline{title}.',
        "",
        f"Loads any checkpoint of `{base}` and adds `apply_concept_edits`,",
        "`fuse_concept_edits`, `unfuse_concept_edits`, `set_concept_edit_scale`, `unload_concept_edits` and the",
        "edit-file methods, without installing diffusers-uce:",
        "",
        f'    pipe = DiffusionPipeline.from_pretrained("{checkpoint}",',
        f'        custom_pipeline="path/to/{file.name}", trust_remote_code=True)',
        '    pipe.apply_concept_edits(erase=["Van Gogh"], guide="art", preserve=["Monet"])',
        "",
        f"In a Hub repository, store it as `{HUB_PIPELINE_FILENAME}` and pass `custom_pipeline=\"user/repo\"`. Saved",
        "pipelines name the base class in model_index.json, so they load without this file.",
        '"""',
    ])
    text = f"{header}\n\n{imports}\n\n\n{code}\n"
    if class_name:
        text += (
            f"\n\n# {'-' * 116}\n# The community pipeline\n# {'-' * 116}\n\n\n"
            f"class {class_name}(UCEMixin, {pipeline_base}):\n"
            f'    r"""`{pipeline_base}` with Unified Concept Editing (Gandikota et al., WACV 2024): see `UCEMixin`.'
            '"""\n\n'
            f"    _uce_family = family_of({pipeline_base})\n"
        )
    return text


def write_community_pipeline(path: str | os.PathLike = DEFAULT_OUTPUT, modules: Sequence[str] | None = None, *,
                             pipeline_base: str = PIPELINE_BASE) -> Path:
    r"""Generate the community pipeline and write it to `path` atomically (see `build_community_pipeline`).

    Args:
        path (`str` or `os.PathLike`, defaults to `"examples/community/pipeline_uce.py"`): the file to write; name it
            `pipeline.py` in a Hub repository for `custom_pipeline="user/repo"`.
        modules (`Sequence[str]`, *optional*): package modules to include.
        pipeline_base (`str`, defaults to `"StableDiffusionPipeline"`): the diffusers class the pipeline extends
            (`"StableDiffusionXLPipeline"`, `"FluxPipeline"`).

    Returns:
        `Path`: the written file.
    """
    path = Path(path)
    write_text_atomic(path, build_community_pipeline(modules, pipeline_base=pipeline_base))
    logger.info(f"community pipeline written to {path}")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffusers_uce.hub.community", description=__doc__.splitlines()[0])
    parser.add_argument("path", nargs="?", help="output file (default: every family's file of COMMUNITY_FILES)")
    parser.add_argument("--pipeline-base", default=PIPELINE_BASE, choices=sorted(COMMUNITY_FILES),
                        help="the diffusers pipeline class to extend, with PATH")
    parser.add_argument("--check", action="store_true", help="exit 1 if a file is not up to date; write nothing")
    args = parser.parse_args(argv)
    targets = {args.path: args.pipeline_base} if args.path else {p: b for b, p in COMMUNITY_FILES.items()}
    for path, base in targets.items():
        if not args.check:
            write_community_pipeline(path, pipeline_base=base)
        elif (Path(path).read_text(encoding="utf-8") if Path(path).is_file() else None) != build_community_pipeline(
                pipeline_base=base):
            logger.error(f"{path} is out of date: run `python -m diffusers_uce.hub.community`")
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

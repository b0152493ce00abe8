"""Generate the single-file diffusers community pipeline from the package's own module sources.

`DiffusionPipeline.from_pretrained(base, custom_pipeline=<file or repo>, trust_remote_code=True)` imports ONE file
(relative imports are not allowed in it) and takes the only `DiffusionPipeline` subclass defined there. This module
builds that file by concatenating the package modules in dependency order, dropping their intra-package imports,
hoisting and merging the other imports, and appending one pipeline class; nothing is copied by hand, so the file
cannot drift from the package (a test regenerates it and compares). The file's class extends the pipeline it is
loaded with, so there is one file per family (`COMMUNITY_FILES`); `python -m diffusers_uce.hub.community` regenerates them
all. A Hub repository serves the file to `custom_pipeline="user/repo"` only under the name `pipeline.py`
(`HUB_PIPELINE_FILENAME`).
"""

from __future__ import annotations

import argparse
import ast
import functools
import importlib.util
import os
import re
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from diffusers.utils import logging

from ..utils.files import write_text_atomic

logger = logging.get_logger(__name__)

PACKAGE = "diffusers_uce"
# Package modules that make up the community pipeline, in dependency order (a stable topological sort by top-level
# imports corrects slips). Add a module here when the mixin starts importing it.
COMMUNITY_MODULES: tuple[str, ...] = (
    "utils.versions", "utils.files", "core.solve", "core.lowrank", "core.edits", "core.concepts", "core.prompts",
    "core.families", "core.targets", "core.engine", "core.report", "loaders.processor", "loaders.edit_state",
    "loaders.edit_file", "loaders.lora", "loaders.debias", "loaders.concept_edit",
)
SHARED_NAMES = frozenset({"logger"})  # may be defined by several modules, if identically
DROPPED_NAMES = frozenset({"__all__"})
PIPELINE_BASE = "StableDiffusionPipeline"
# The committed file of each family (by pipeline class), and the checkpoint its docstring's example loads.
COMMUNITY_FILES = {"StableDiffusionPipeline": "examples/community/pipeline_uce.py",
                   "StableDiffusionXLPipeline": "examples/community/pipeline_uce_sdxl.py",
                   "FluxPipeline": "examples/community/pipeline_uce_flux.py"}
_EXAMPLE_CHECKPOINTS = {"StableDiffusionPipeline": "CompVis/stable-diffusion-v1-4",
                        "StableDiffusionXLPipeline": "stabilityai/stable-diffusion-xl-base-1.0",
                        "FluxPipeline": "black-forest-labs/FLUX.1-dev"}
HUB_PIPELINE_FILENAME = "pipeline.py"  # what diffusers fetches for `custom_pipeline="user/repo"`
DEFAULT_OUTPUT = COMMUNITY_FILES[PIPELINE_BASE]
CITATION = ('R. Gandikota, H. Orgad, Y. Belinkov, J. Materzyńska, D. Bau, "Unified Concept Editing in Diffusion '
            'Models", WACV 2024, arXiv:2308.14761')
_WIDTH = 119


@dataclass
class _Module:
    """One package module, parsed: what to drop or replace, what it imports and defines."""

    name: str
    lines: list[str]
    docstring: str | None = None
    first_line: int = 0  # 0-based index of the first statement (lines before it are header comments)
    drop: set[int] = field(default_factory=set)
    replace: dict[int, str] = field(default_factory=dict)
    future: set[str] = field(default_factory=set)
    imports: list[tuple[str, str, str | None, str | None]] = field(default_factory=list)  # kind, module, name, as
    deps: set[str] = field(default_factory=set)  # package modules imported at top level
    namespaces: set[str] = field(default_factory=set)  # modules imported whole: `from ..core import engine`
    uses: list[tuple[str, str]] = field(default_factory=list)  # (module, name) imported from package modules
    defs: dict[str, tuple[str, ast.stmt]] = field(default_factory=dict)  # name -> (ast dump, statement)


def _path(name: str) -> str:
    """A module's file, for messages and section headers: `core.solve` is `diffusers_uce/core/solve.py`."""
    return f"{PACKAGE}/{name.replace('.', '/')}.py"


def _statement_lines(module: _Module, node: ast.stmt) -> range:
    """The 0-based lines of a statement, which must stand alone on them (no `;` neighbours)."""
    first, last = node.lineno - 1, node.end_lineno - 1
    before = module.lines[first][: node.col_offset]
    after = module.lines[last][node.end_col_offset:].strip()
    if before.strip() or (after and not after.startswith("#")):
        raise ValueError(f"{_path(module.name)}:{node.lineno}: put this import on its own line(s) so that "
                         "the community pipeline builder can rewrite it")
    return range(first, last + 1)


def _package_module(node: ast.ImportFrom, module: _Module) -> str | None:
    """The package module (dotted, relative to the package: `core.solve`; `""` for the package itself) that
    `from .x import ...`, `from ..core.x import ...` or `from diffusers_uce.x import ...` reads, else `None`."""
    if node.level == 0:
        if node.module == PACKAGE or (node.module or "").startswith(PACKAGE + "."):
            return (node.module or "").removeprefix(PACKAGE).removeprefix(".")
        return None
    parts = module.name.split(".")[:-1]
    if node.level - 1 > len(parts):
        raise ValueError(f"{_path(module.name)}:{node.lineno}: the relative import goes above the package")
    parts = parts[: len(parts) - (node.level - 1)]
    return ".".join(parts + ([node.module] if node.module else []))


def _rewrite_package_import(module: _Module, node: ast.ImportFrom, source: str, nested: bool,
                            known: frozenset[str]) -> None:
    """Drop an intra-package import: names are shared in one file; aliases become assignments."""
    lines = _statement_lines(module, node)
    indent = module.lines[lines[0]][: node.col_offset]
    replacement = []
    for alias in node.names:
        if alias.name == "*":
            raise ValueError(f"{_path(module.name)}:{node.lineno}: star imports are not supported")
        submodule = f"{source}.{alias.name}".lstrip(".")
        if submodule in known:  # `from ..core import engine`: the module becomes a namespace object
            module.namespaces.add(submodule)
        else:
            module.uses.append((source, alias.name))
        if not nested:
            module.deps.add(submodule if submodule in known else source)
        if alias.asname and alias.asname != alias.name:
            replacement.append(f"{alias.asname} = {alias.name}")
            if not nested:  # a new top-level name: checked for clashes like a definition
                module.defs[alias.asname] = (f"alias of {PACKAGE}.{submodule}", node)
    module.drop.update(lines)
    if nested or replacement:
        module.replace[lines[0]] = indent + ("; ".join(replacement) or "pass")


def _bound_names(node: ast.stmt) -> list[str]:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [node.name]
    targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) \
        else []
    return [n.id for target in targets for n in ast.walk(target) if isinstance(n, ast.Name)]


def parse_module(name: str, source: str, known: Iterable[str] = ()) -> _Module:
    """Parse one package module for the builder (see `build_community_pipeline`).

    Args:
        name (`str`): the module's dotted name inside the package (`"core.solve"`).
        source (`str`): its source.
        known (`Iterable[str]`): every module of the build: `from ..core import engine` imports the module
            `core.engine` when it is one of them, else the name `engine` from `core`.
    """
    known = frozenset(known)
    tree = ast.parse(source)
    module = _Module(name=name, lines=source.splitlines())
    body = list(tree.body)
    module.first_line = body[0].lineno - 1 if body else 0
    if (docstring := ast.get_docstring(tree, clean=True)) is not None:
        module.docstring = docstring
        module.drop.update(_statement_lines(module, body.pop(0)))
    top = {id(node) for node in body}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == PACKAGE for a in node.names):
            raise ValueError(f"{_path(name)}:{node.lineno}: use `from .module import name`, not `import "
                             f"{PACKAGE}`, so that the community pipeline builder can resolve it")
        if isinstance(node, ast.ImportFrom) and (source_module := _package_module(node, module)) is not None:
            _rewrite_package_import(module, node, source_module, nested=id(node) not in top, known=known)
    for node in body:
        if isinstance(node, ast.ImportFrom) and node.module == "__future__":
            module.future.update(a.name for a in node.names)
            module.drop.update(_statement_lines(module, node))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and _package_module(node, module) is None:
            if any(a.name == "*" for a in node.names):
                raise ValueError(f"{_path(name)}:{node.lineno}: star imports are not supported")
            module.imports += [("from", node.module, a.name, a.asname) for a in node.names]
            module.drop.update(_statement_lines(module, node))
        elif isinstance(node, ast.Import):
            module.imports += [("import", a.name, None, a.asname) for a in node.names]
            module.drop.update(_statement_lines(module, node))
        else:
            for bound in _bound_names(node):
                if bound in DROPPED_NAMES:
                    module.drop.update(_statement_lines(module, node))
                elif bound in module.defs:
                    raise ValueError(f"{_path(name)} defines {bound!r} twice")
                else:
                    module.defs[bound] = (ast.dump(node), node)
    return module


def _binding(entry: tuple[str, str, str | None, str | None]) -> tuple[str, str]:
    """(bound name, what it refers to) of one import entry."""
    kind, mod, name, asname = entry
    if kind == "import":
        return (asname, mod) if asname else (mod.split(".")[0], mod.split(".")[0])
    return asname or name, f"{mod}.{name}"


def _order(modules: dict[str, _Module], preferred: Sequence[str]) -> list[str]:
    """Stable topological order by top-level package imports (raises on a cycle or a missing module)."""
    for module in modules.values():
        missing = sorted((module.deps | {m for m, _ in module.uses} | module.namespaces) - set(modules))
        if missing:
            raise ValueError(f"{_path(module.name)} imports {', '.join('.' + m for m in missing)}, which the "
                             f"community pipeline does not include: add it to {PACKAGE}.community.COMMUNITY_MODULES")
    placed: list[str] = []
    while len(placed) < len(modules):
        ready = [m for m in preferred if m not in placed and modules[m].deps <= set(placed)]
        if not ready:
            raise ValueError(f"circular top-level imports among {sorted(set(modules) - set(placed))}")
        placed.append(ready[0])
    return placed


def _check_names(modules: list[_Module], extra: list[tuple[str, str, str | None, str | None]],
                 class_name: str | None) -> None:
    """Raise on any name two modules would bind differently in the one file; drop identical shared definitions."""
    by_module = {m.name: m for m in modules}
    bindings: dict[str, set[str]] = {}
    for entry in [e for m in modules for e in m.imports] + extra:
        bound, target = _binding(entry)
        bindings.setdefault(bound, set()).add(target)
    for bound, targets in bindings.items():
        if len(targets) > 1:
            raise ValueError(f"name clash in the community pipeline: {bound!r} is imported as "
                             f"{' and '.join(sorted(targets))} by different modules; import one under another name")
    owners = {name: [m for m in modules if name in m.defs] for module in modules for name in module.defs}
    namespaces = {n.rsplit('.', 1)[-1] for m in modules for n in m.namespaces}
    for name, where in owners.items():
        dumps = {m.defs[name][0] for m in where}
        if len(where) > 1 and not (name in SHARED_NAMES and len(dumps) == 1):
            raise ValueError(f"name clash in the community pipeline: {name!r} is defined in "
                             f"{', '.join(_path(m.name).removeprefix(PACKAGE + '/') for m in where)}; rename one (private helpers too)")
        clash = [what for what, names in (("an import", bindings), ("a module namespace", namespaces),
                                          ("the pipeline class", {class_name})) if name in names]
        if clash:
            where_defined = _path(where[0].name).removeprefix(PACKAGE + "/")
            raise ValueError(f"name clash in the community pipeline: {name!r}, defined in {where_defined}, is "
                             f"also {clash[0]}")
        for duplicate in where[1:]:  # identical shared definitions (`logger`): keep the first
            duplicate.drop.update(_statement_lines(duplicate, duplicate.defs[name][1]))
    for module in modules:
        for source, name in module.uses:
            origin = by_module[source]
            if name not in origin.defs and name not in {_binding(e)[0] for e in origin.imports}:
                raise ValueError(f"{_path(module.name)} imports {name!r} from .{source}, which does not define it")
    if class_name in bindings or class_name in namespaces:
        raise ValueError(f"name clash in the community pipeline: {class_name!r} is already bound")


def _format_imports(entries: list[tuple[str, str, str | None, str | None]]) -> str:
    plain: dict[bool, set[str]] = {True: set(), False: set()}
    froms: dict[str, set[str]] = {}
    for kind, mod, name, asname in entries:
        if kind == "import":
            line = f"import {mod}" + (f" as {asname}" if asname else "")
            plain[mod.split(".")[0] in sys.stdlib_module_names].add(line)
        else:
            froms.setdefault(mod, set()).add(name + (f" as {asname}" if asname else ""))
    groups = []
    for stdlib in (True, False):
        lines = sorted(plain[stdlib])
        for mod in sorted(m for m in froms if (m.split(".")[0] in sys.stdlib_module_names) == stdlib):
            names = sorted(froms[mod])
            line = f"from {mod} import {', '.join(names)}"
            lines.append(line if len(line) <= _WIDTH else f"from {mod} import (\n" + "".join(
                f"    {n},\n" for n in names) + ")")
        if lines:
            groups.append("\n".join(lines))
    return "\n\n".join(groups)


def _namespace(module: _Module) -> str:
    package, _, name = module.name.rpartition(".")
    items = textwrap.fill(" ".join(f"{n}={n}," for n in module.defs if not n.startswith("__")), _WIDTH,
                          initial_indent="    ", subsequent_indent="    ", break_on_hyphens=False)
    return (f"# `from {'..' + package if package else '.'} import {name}` in the package: {name}.py's names as one "
            "object\n"
            f"{name} = types.SimpleNamespace(\n{items}\n)")


def _section(module: _Module, namespace: bool = False) -> str:
    """A module's code in the file, with its names gathered into a namespace object too when `namespace`."""
    out = [f"# {'-' * 116}", f"# {_path(module.name)}", f"# {'-' * 116}"]
    out += [f"# {line}".rstrip() for line in (module.docstring or "").splitlines()]
    out.append("")
    for index in range(module.first_line, len(module.lines)):
        if index in module.replace:
            out.append(module.replace[index])
        elif index not in module.drop:
            out.append(module.lines[index].rstrip())
    text = re.sub(r"\n{4,}", "\n\n\n", "\n".join(out)).strip("\n")
    return text + ("\n\n\n" + _namespace(module) if namespace else "")


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

    parsed = {name: parse_module(name, source, known=sources) for name, source in sources.items()}
    ordered = [parsed[name] for name in _order(parsed, list(sources))]
    class_name = f"UCE{pipeline_base}" if pipeline_base else None
    extra = [("from", "diffusers", pipeline_base, None)] if pipeline_base else []
    if any(m.namespaces for m in ordered):
        extra.append(("import", "types", None, None))
    _check_names(ordered, extra, class_name)

    future = sorted(set().union(*(m.future for m in ordered)))
    namespaces = {n for m in ordered for n in m.namespaces}
    sections = [_section(module, module.name in namespaces) for module in ordered]
    title = f": `{class_name}`" if class_name else ""
    base = pipeline_base or PIPELINE_BASE
    checkpoint, file = _EXAMPLE_CHECKPOINTS.get(base, "<checkpoint>"), Path(COMMUNITY_FILES.get(base, DEFAULT_OUTPUT))
    header = "\n".join([
        f"# Generated by `python -m diffusers_uce.hub.community` from diffusers-uce {__version__}. DO NOT EDIT:",
        "# change the package and regenerate this file. Modules, in order:",
        f"# {', '.join(m.name for m in ordered)}.",
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
    imports = "\n".join(f"from __future__ import {f}" for f in future)
    imports += "\n\n" + _format_imports([e for m in ordered for e in m.imports] + extra)
    text = f"{header}\n\n{imports.strip()}\n\n\n" + "\n\n\n".join(sections) + "\n"
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

"""Merge the modules of a package into one Python file: intra-package imports dropped (aliases kept as
assignments, whole-module imports as namespace objects), other imports hoisted and merged, modules in dependency
order, and every name checked so that no two modules bind it differently."""

from __future__ import annotations

import ast
import re
import sys
import textwrap
from dataclasses import dataclass, field
from typing import Iterable, Sequence

PACKAGE = "diffusers_uce"
SHARED_NAMES = frozenset({"logger"})  # may be defined by several modules, if identically
DROPPED_NAMES = frozenset({"__all__"})
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
                             f"community pipeline does not include: add it to "
                             f"{PACKAGE}.hub.community.COMMUNITY_MODULES")
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
                             f"{', '.join(_path(m.name).removeprefix(PACKAGE + '/') for m in where)}; rename one "
                             "(private helpers too)")
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


def merge_sources(sources: dict[str, str], extra: list[tuple[str, str, str | None, str | None]] | None = None,
                  reserved: str | None = None) -> tuple[list[str], str, str]:
    r"""Merge module sources into the parts of one file.

    Args:
        sources (`dict[str, str]`): dotted module name inside the package (`"core.solve"`) to source, in the
            preferred order.
        extra (`list`, *optional*): imports the file needs besides the modules' own, as
            `("from", module, name, alias)` or `("import", module, None, alias)`.
        reserved (`str`, *optional*): a name the caller defines after the modules (checked for clashes).

    Returns:
        `tuple[list[str], str, str]`: the modules in dependency order, the import block (`__future__` first) and
        the modules' code.

    Raises:
        `ValueError`: when two modules bind one name differently, a module imports one that is not given, the
        imports are circular, or an intra-package import cannot be rewritten.
    """
    parsed = {name: parse_module(name, source, known=sources) for name, source in sources.items()}
    ordered = [parsed[name] for name in _order(parsed, list(sources))]
    extra = list(extra or [])
    if any(m.namespaces for m in ordered):
        extra.append(("import", "types", None, None))
    _check_names(ordered, extra, reserved)
    future = sorted(set().union(*(m.future for m in ordered)))
    namespaces = {n for m in ordered for n in m.namespaces}
    sections = [_section(module, module.name in namespaces) for module in ordered]
    imports = "\n".join(f"from __future__ import {f}" for f in future)
    imports += "\n\n" + _format_imports([e for m in ordered for e in m.imports] + extra)
    return [m.name for m in ordered], imports.strip(), "\n\n\n".join(sections)

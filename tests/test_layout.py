"""The package's architecture, checked: wings whose imports point down, no import circle, no module over 400 lines,
and the pipeline's private edit state touched only by `loaders/`."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "diffusers_uce"
# Lower wings never import higher ones; wings of the same rank do not import each other.
RANKS = {"utils": 0, "core": 1, "loaders": 2, "hub": 3, "evaluation": 3, "demo": 3, "pipelines": 4, "commands": 5}
MAX_LINES = 400


def modules() -> dict[str, Path]:
    return {".".join(p.relative_to(PACKAGE).with_suffix("").parts): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(name: str, path: Path) -> set[str]:
    """Package modules (dotted, `core.solve`) or packages (`core`) that a module imports, nested imports included."""
    package = name.split(".")[:-1] if not path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
            known = modules()
            for alias in node.names:
                sub = f"{target}.{alias.name}".lstrip(".")
                found.add(sub if sub in known or f"{sub}.__init__" in known else target)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("diffusers_uce"):
            found.add(node.module.removeprefix("diffusers_uce").lstrip("."))
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("diffusers_uce").lstrip(".") for a in node.names
                      if a.name.startswith("diffusers_uce")}
    return {f for f in found if f}


def wing(name: str) -> str:
    return name.split(".")[0]


def test_imports_point_down_the_wings():
    upward = []
    for name, path in modules().items():
        if name == "__init__":  # the package's front door re-exports the public names
            continue
        for target in imports(name, path):
            if wing(target) != wing(name) and RANKS[wing(target)] >= RANKS[wing(name)]:
                upward.append(f"{name} -> {target}")
    assert not upward, upward


def test_no_import_circle():
    graph = {name: {t.removesuffix(".__init__") for t in imports(name, path)} for name, path in modules().items()}
    graph = {n.removesuffix(".__init__"): deps for n, deps in graph.items()}
    state: dict[str, int] = {}

    def visit(node, trail):
        if state.get(node) == 1:
            pytest.fail("import circle: " + " -> ".join(trail[trail.index(node):] + [node]))
        if state.get(node) == 2 or node not in graph:
            return
        state[node] = 1
        for dep in sorted(graph[node]):
            if dep != node and not node.startswith(dep + "."):  # a package's own __init__ is not a circle
                visit(dep, trail + [node])
        state[node] = 2

    for node in sorted(graph):
        visit(node, [])


def test_no_module_over_the_size_limit():
    long = {name: n for name, path in modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_only_loaders_touch_the_edit_state():
    outside = [name for name, path in modules().items()
               if wing(name) != "loaders" and "_uce_state" in path.read_text(encoding="utf-8")]
    assert not outside, outside


def test_docstrings_speak_to_users():
    cited = [name for name, path in modules().items()
             if any(ref in path.read_text(encoding="utf-8") for ref in ("DESIGN.md", "issue #", "§"))]
    assert not cited, cited

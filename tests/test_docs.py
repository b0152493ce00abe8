"""The README stays a short page for users, and it and the documentation site only point at what a clone holds;
the test command (README, CI) builds the site strictly."""

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
MAX_LINES, MAX_WORDS = 250, 2000
# Markdown links and images with a relative target: [text](target) / ![alt](target).
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def pages() -> list[Path]:
    return [README, *sorted((REPO / "docs").rglob("*.md"))]


def test_readme_is_short():
    text = README.read_text(encoding="utf-8")
    lines, words = len(text.splitlines()), len(text.split())
    assert lines <= MAX_LINES, f"README.md has {lines} lines (at most {MAX_LINES}): move detail to docs/"
    assert words <= MAX_WORDS, f"README.md has {words} words (at most {MAX_WORDS}): move detail to docs/"


@pytest.mark.parametrize("page", pages(), ids=lambda p: p.relative_to(REPO).as_posix())
def test_pages_point_only_inside_the_repository(page):
    text = page.read_text(encoding="utf-8")
    assert "../shared" not in text and "DESIGN.md" not in text, "a clone has no ../shared: link inside the repo"
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        path = (page.parent / target.split("#")[0]).resolve()
        assert path.is_relative_to(REPO), f"{target} leaves the repository"
        assert path.exists(), f"{page.name} links to {target}, which does not exist"


def test_the_test_command_builds_the_docs_strictly():
    readme = README.read_text(encoding="utf-8")
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    (command,) = [line for line in readme.splitlines() if "python -m pytest -q" in line]
    for text in (command, ci):
        assert '-e ".[test,docs]"' in text and "mkdocs build --strict" in text
    assert (REPO / "mkdocs.yml").is_file()

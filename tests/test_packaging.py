"""The built wheel: every package and every file read at run time is in it, the licence and metadata are complete,
and it works installed outside the repository (card template, shipped data sets, `__version__` = metadata)."""

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# What a clean checkout holds that a build needs; build/ and egg-info of earlier builds would leak stale files.
SKIP = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", "site",
                              "uce-output", "tests", "benchmarks", "examples", "docs")

# Run outside the repository, with the installed wheel first on the path: what the package finds there.
PROBE = r"""
import json, sys
from importlib import metadata
from pathlib import Path

import diffusers_uce
from diffusers_uce.core.speed_options import retain_set
from diffusers_uce.evaluation.robust_sets import ROBUST_PROMPT_SETS, load_robust_prompts
from diffusers_uce.hub.cards import template_path

with template_path() as path:
    template = str(path)
print(json.dumps({
    "package": str(Path(diffusers_uce.__file__).parent),
    "version": diffusers_uce.__version__,
    "template": template,
    "retain": {name: len(retain_set(name)) for name in ("artists", "instances", "celebrities")},
    "robust": {name: len(load_robust_prompts(name)) for name in ROBUST_PROMPT_SETS},
}))
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    pytest.importorskip("setuptools", minversion="77")
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(REPO, src, ignore=SKIP)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q", "-w",
         str(tmp / "dist")], capture_output=True, text=True, timeout=300,
    )
    if result.returncode != 0 and "No module named pip" in result.stderr:
        pytest.skip("pip is not available")
    assert result.returncode == 0, result.stderr[-3000:]
    (built,) = (tmp / "dist").glob("*.whl")
    return built


def test_wheel_holds_every_package_and_data_file(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    packages = {p.parent.relative_to(REPO).as_posix() for p in (REPO / "diffusers_uce").rglob("__init__.py")}
    missing = {f"{p}/__init__.py" for p in packages} - names
    assert not missing, f"packages missing from the wheel (list them in pyproject.toml): {sorted(missing)}"
    data = {p.relative_to(REPO).as_posix() for p in (REPO / "diffusers_uce" / "core" / "data").rglob("*")
            if p.is_file()}
    assert data and data <= names, sorted(data - names)
    assert {"diffusers_uce/model_cards/uce_card.md.jinja", "diffusers_uce/model_cards/__init__.py"} <= names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)


def test_metadata_is_complete(wheel):
    with zipfile.ZipFile(wheel) as zf:
        (meta,) = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")]
        text = zf.read(meta).decode()
    assert "License-Expression: MIT" in text and "Requires-Python: >=3.10" in text
    for extra in ("lora", "eval", "docs", "test"):
        assert f"Provides-Extra: {extra}" in text
    for dep in ("torch", "diffusers", "transformers"):
        assert any(line.startswith(f"Requires-Dist: {dep}>=") for line in text.splitlines()), dep
    assert "Project-URL: Documentation, " in text and "Keywords: diffusers," in text
    assert "Classifier: Topic :: Scientific/Engineering :: Artificial Intelligence" in text
    assert "MIT License" in (REPO / "LICENSE").read_text(encoding="utf-8")


def test_installed_wheel_works_outside_the_repository(wheel, tmp_path):
    target = tmp_path / "site"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # The wheel first, then the venv's dependencies; never the repository (the cwd is elsewhere, PYTHONPATH replaced).
    env = {"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "PYTHONNOUSERSITE": "1"}
    run = subprocess.run([sys.executable, "-c", PROBE], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    found = json.loads(run.stdout.strip().splitlines()[-1])
    assert Path(found["package"]).is_relative_to(target), found["package"]
    assert Path(found["template"]).is_relative_to(target), found["template"]
    assert all(count > 0 for count in found["retain"].values()), found["retain"]
    assert found["robust"] and all(count > 0 for count in found["robust"].values()), found["robust"]
    with zipfile.ZipFile(wheel) as zf:
        (meta,) = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")]
        version = next(line.split(": ", 1)[1] for line in zf.read(meta).decode().splitlines()
                       if line.startswith("Version: "))
    assert found["version"] == version

"""The single-file community pipelines (one per family): generated from the package, up to date, loadable without
the plugin."""

import ast
import json
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline, FluxPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.utils.dynamic_modules_utils import get_relative_imports

import diffusers_uce
from diffusers_uce.demo import make_demo_pipeline
from diffusers_uce.hub import community
from diffusers_uce.hub.cards import card_for_pipeline
from diffusers_uce.hub.community import (
    COMMUNITY_FILES,
    COMMUNITY_MODULES,
    DEFAULT_OUTPUT,
    HUB_PIPELINE_FILENAME,
    build_community_pipeline,
    build_from_sources,
    write_community_pipeline,
)
from tests.support import REPO
from tests.support.helpers import rel
from tests.support.helpers import weights as edited_weights

COMMITTED = REPO / DEFAULT_OUTPUT
EDIT = dict(erase=["van gogh", "picasso"], guide=["art", ""], preserve=["monet", "a photo of a dog"], lamb=0.7,
            held_out=[])
BASE_CLASSES = {"sd1": StableDiffusionPipeline, "sd2": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline,
                "flux": FluxPipeline}
PIPELINE_BASES = sorted(COMMUNITY_FILES)  # one generated file per family, by the class it extends


@pytest.fixture(scope="module")
def sources():
    """`get(pipeline_base)`: the freshly generated community pipeline extending that class (built once)."""
    built = {}

    def get(base=community.PIPELINE_BASE):
        if base not in built:
            built[base] = build_community_pipeline(pipeline_base=base)
        return built[base]

    return get


@pytest.fixture(scope="module")
def source(sources):
    return sources()


@pytest.fixture(scope="module")
def base_dirs(tmp_path_factory):
    """`get(family)`: a folder holding the family's tiny pipeline, saved once."""
    saved = {}

    def get(family):
        if family not in saved:
            saved[family] = tmp_path_factory.mktemp(f"{family}_base")
            make_demo_pipeline(family).save_pretrained(saved[family])
        return saved[family]

    return get


@pytest.fixture
def base_dir(base_dirs):
    return base_dirs("sd1")


def committed_file(family):
    return REPO / COMMUNITY_FILES[BASE_CLASSES[family].__name__]


def package_imports(tree):
    """Import statements that would need diffusers_uce, or a sibling file, at load time."""
    return [ast.unparse(n) for n in ast.walk(tree) if (isinstance(n, ast.ImportFrom) and (
        n.level > 0 or (n.module or "").split(".")[0] == "diffusers_uce")) or (isinstance(n, ast.Import) and any(
            a.name.split(".")[0] == "diffusers_uce" for a in n.names))]


class TestGeneratedFile:
    @pytest.mark.parametrize("base", PIPELINE_BASES)
    def test_committed_file_is_up_to_date(self, sources, base):
        path = REPO / COMMUNITY_FILES[base]
        assert path.is_file(), "run `python -m diffusers_uce.hub.community`"
        assert path.read_text(encoding="utf-8") == sources(base), (
            f"{COMMUNITY_FILES[base]} is out of date with the package: run `python -m diffusers_uce.hub.community`"
        )

    @pytest.mark.parametrize("base", PIPELINE_BASES)
    def test_compiles_without_package_or_relative_imports(self, sources, base, tmp_path):
        source = sources(base)
        tree = ast.parse(source)
        compile(source, "pipeline_uce.py", "exec")
        assert package_imports(tree) == []
        path = tmp_path / "pipeline_uce.py"
        path.write_text(source)
        assert get_relative_imports(str(path)) == []  # what diffusers would try to copy next to the file
        assert source.count("from __future__ import") == 1
        classes = [n for n in tree.body if isinstance(n, ast.ClassDef)]
        assert len(classes) == len({c.name for c in classes})
        assert classes[-1].name == f"UCE{base}" and [ast.unparse(b) for b in classes[-1].bases] == ["UCEMixin", base]
        header, docstring = source.split('"""', 2)[:2]
        assert "DO NOT EDIT" in header and "MIT" in header and "arXiv:2308.14761" in header
        assert diffusers_uce.__version__ in header
        assert f"checkpoint of `{base}`" in docstring and Path(COMMUNITY_FILES[base]).name in docstring

    def test_includes_every_module_the_mixin_needs(self, source):
        included = source.split("Modules, in order:\n# ", 1)[1].split(".\n", 1)[0].split(", ")
        assert included[-1] == "loaders.concept_edit" and set(included) <= set(COMMUNITY_MODULES)
        assert {"core.solve", "core.edits", "core.engine", "loaders.processor"} <= set(included)

    def test_write_is_atomic_and_cli_regenerates(self, source, tmp_path, monkeypatch):
        out = write_community_pipeline(tmp_path / "sub" / "pipeline_uce.py")
        assert out.read_text(encoding="utf-8") == source
        assert sorted(p.name for p in out.parent.iterdir()) == ["pipeline_uce.py"]
        from diffusers_uce.hub.community import main

        # main() below compares and writes what the builder gives; that build is the one just checked.
        monkeypatch.setattr(community, "build_community_pipeline", lambda modules=None, *, pipeline_base: source)

        assert main(["--check", str(out)]) == 0
        out.write_text(source + "# edited by hand\n")
        assert main(["--check", str(out)]) == 1
        assert main([str(out)]) == 0 and out.read_text(encoding="utf-8") == source

    def test_cli_regenerates_every_family(self, sources, tmp_path, monkeypatch):
        from diffusers_uce.hub.community import main

        monkeypatch.chdir(tmp_path)  # COMMUNITY_FILES are relative to the current folder (the repository's root)
        built = []  # the builds are the test above's; this one checks which file gets which class
        build = lambda modules=None, *, pipeline_base: built.append(pipeline_base) or sources(pipeline_base)  # noqa
        monkeypatch.setattr(community, "build_community_pipeline", build)
        assert main(["--check"]) == 1  # no files yet
        built.clear()
        assert main([]) == 0 and sorted(built) == PIPELINE_BASES
        for base, path in COMMUNITY_FILES.items():
            assert (tmp_path / path).read_text(encoding="utf-8") == sources(base)
        assert main(["--check"]) == 0
        (tmp_path / COMMUNITY_FILES["FluxPipeline"]).write_text(sources("StableDiffusionPipeline"))
        assert main(["--check"]) == 1
        assert main(["--pipeline-base", "FluxPipeline", str(tmp_path / "flux.py")]) == 0
        assert (tmp_path / "flux.py").read_text(encoding="utf-8") == sources("FluxPipeline")


class TestBuilder:
    """The concatenation rules, on small made-up modules (no pipeline class appended)."""

    def build(self, **sources):
        return build_from_sources({k: textwrap.dedent(v) for k, v in sources.items()}, pipeline_base=None)

    def test_rewrites_package_imports_and_hoists_the_rest(self):
        text = self.build(
            b='''
            """Module b."""
            from __future__ import annotations

            import json
            from diffusers.utils import logging

            from . import a
            from .a import (
                helper,
                CONSTANT as K,
            )

            logger = logging.get_logger(__name__)


            def use():
                from .a import helper as late

                return a.helper() + helper() + late() + K + len(json.dumps({}))
            ''',
            a='''
            from __future__ import annotations
            import json
            from diffusers.utils import logging
            logger = logging.get_logger(__name__)
            CONSTANT = 1


            def helper():
                return 10
            ''',
        )
        tree = ast.parse(text)
        assert package_imports(tree) == []
        assert text.count("import json") == 1 and text.count("from __future__") == 1
        assert text.count("logger = logging.get_logger(__name__)") == 1
        assert text.index("def helper") < text.index("def use")  # dependency order, not the given one
        namespace = {}
        exec(compile(text, "generated.py", "exec"), namespace)
        assert namespace["use"]() == 10 + 10 + 10 + 1 + 2

    @pytest.mark.parametrize("sources, message", [
        ({"a": "def helper():\n    return 1\n", "b": "def helper():\n    return 2\n"},
         "'helper' is defined in a.py, b.py"),
        ({"a": "_cache = {}\n", "b": "_cache = {}\n"}, "'_cache' is defined in"),
        ({"a": "import logging\n", "b": "from diffusers.utils import logging\n"}, "'logging' is imported as"),
        ({"a": "from typing import Sequence\n", "b": "Sequence = list\n"}, "'Sequence', defined in b.py"),
        ({"a": "from .missing import x\n"}, "imports .missing"),
        ({"a": "from .b import nothing\n", "b": "x = 1\n"}, "does not define it"),
        ({"a": "from .b import x\nx2 = 1\n", "b": "from .a import x2\nx = 1\n"}, "circular"),
        ({"a": "import diffusers_uce.core.edits\n"}, "not `import diffusers_uce`"),
        ({"a": "import os; from .b import x\n", "b": "x = 1\n"}, "on its own line"),
    ])
    def test_refuses_what_would_break_the_file(self, sources, message):
        with pytest.raises(ValueError, match=message.replace(".", r"\.").replace("(", r"\(")):
            build_from_sources(sources, pipeline_base=None)


class TestCustomPipeline:
    def load(self, base_dir, path=COMMITTED):
        return DiffusionPipeline.from_pretrained(base_dir, custom_pipeline=str(path), trust_remote_code=True)

    def test_loads_without_the_plugin_and_edits_like_it(self, family, base_dirs, tmp_path):
        """The committed file of each family, loaded onto a saved pipeline of the family, edits like the plugin."""
        pipe = self.load(base_dirs(family), committed_file(family))
        cls, base = type(pipe), BASE_CLASSES[family]
        assert cls.__name__ == f"UCE{base.__name__}" and isinstance(pipe, base)
        assert not cls.__module__.startswith("diffusers_uce") and cls.__module__.startswith("diffusers_modules")
        assert not isinstance(pipe, diffusers_uce.UCEMixin)  # its own copy of the code, not the package's
        assert all(not c.__module__.startswith("diffusers_uce") for c in cls.__mro__)

        plugin = diffusers_uce.attach(make_demo_pipeline(family))
        assert cls._uce_family.name == plugin._uce_family.name
        before = edited_weights(pipe)
        assert all(torch.equal(before[n], w) for n, w in edited_weights(plugin).items())
        ours, theirs = pipe.apply_concept_edits(**EDIT), plugin.apply_concept_edits(**EDIT)
        assert [e.to_dict() for e in ours.edits] == [e.to_dict() for e in theirs.edits]
        assert ours.report.to_dict() == theirs.report.to_dict()
        card = card_for_pipeline(pipe, "adapter", report=ours)  # the plugin's cards read the community copy's records
        assert "| 1 | van gogh → art; picasso → *unconditional* |" in card.text and "0.7" in card.text
        pipe.fuse_concept_edits()
        plugin.fuse_concept_edits()
        after, expected = edited_weights(pipe), edited_weights(plugin)
        assert any(not torch.equal(after[n], before[n]) for n in after)
        assert all(torch.equal(after[n], expected[n]) for n in expected)

        pipe.save_pretrained(tmp_path / "fused")
        index = json.loads((tmp_path / "fused" / "model_index.json").read_text())
        assert index["_class_name"] == base.__name__
        reloaded = DiffusionPipeline.from_pretrained(tmp_path / "fused")
        assert type(reloaded) is base
        assert all(torch.equal(w, expected[n]) for n, w in edited_weights(reloaded).items())

        pipe.unload_concept_edits()
        assert all(torch.equal(w, before[n]) for n, w in edited_weights(pipe).items())

        # An edit file written by the plugin loads into the community pipeline (the adapter card's route).
        plugin.save_concept_edits(tmp_path / "edits")
        pipe.load_concept_edits(str(tmp_path / "edits"))
        assert [e.to_dict() for e in pipe.concept_edits] == [e.to_dict() for e in plugin.concept_edits]
        pipe.fuse_concept_edits()  # through T (the file stores T only), the applied edit fused through T − I's factors
        assert all(rel(w, expected[n]) < 1e-6 * max(1.0, rel(expected[n], before[n]))
                   for n, w in edited_weights(pipe).items())

    @pytest.mark.parametrize("family", ["sd1", "sdxl", "flux"])  # one per file
    def test_runs_where_the_package_cannot_be_imported(self, family, base_dirs, monkeypatch):
        folder = base_dirs(family)  # (built with the package, before it goes)
        # As on a machine without the plugin: any `import diffusers_uce[.x]` now raises (restored after the test).
        for name in [m for m in sys.modules if m == "diffusers_uce" or m.startswith("diffusers_uce.")]:
            monkeypatch.delitem(sys.modules, name)
        monkeypatch.setitem(sys.modules, "diffusers_uce", None)
        with pytest.raises(ImportError):
            import diffusers_uce.core.edits  # noqa: F401
        pipe = self.load(folder, committed_file(family))
        out = pipe.apply_concept_edits(erase=["van gogh"], guide="art", preserve=["monet"], held_out=[])
        pipe.fuse_concept_edits()
        pipe.set_concept_edit_scale(0.5)
        pipe.unload_concept_edits()
        assert out.report.erased[0]["efficacy"] > 0.5
        assert not [m for m in sys.modules if m.startswith("diffusers_uce.")]

    def test_loads_from_a_hub_repo_as_pipeline_py(self, hub_server, hub_token, base_dir):
        from huggingface_hub import HfApi

        api = HfApi(endpoint=hub_server.endpoint, token=hub_token)
        repo_id = f"user/uce-community-{uuid.uuid4().hex[:8]}"
        api.create_repo(repo_id)
        api.upload_file(path_or_fileobj=COMMITTED.read_bytes(), path_in_repo=HUB_PIPELINE_FILENAME, repo_id=repo_id)
        pipe = DiffusionPipeline.from_pretrained(base_dir, custom_pipeline=repo_id, trust_remote_code=True)
        assert type(pipe).__name__ == "UCEStableDiffusionPipeline"
        assert repo_id.replace("/", "--") in type(pipe).__module__
        out = pipe.apply_concept_edits(erase="van gogh", guide="art", held_out=[])
        assert out.report.erased[0]["efficacy"] > 0.5

"""Model cards: Hub metadata for both kinds and every family, the edit table and report, partial data, README kept,
template shipped."""

import importlib.resources
import logging

import pytest
from huggingface_hub import ModelCard

import diffusers_uce
from diffusers_uce import ConceptEdit
from diffusers_uce.core.families import FLUX
from diffusers_uce.demo import make_demo_pipeline
from diffusers_uce.hub.cards import (
    DEFAULT_TEMPLATE,
    TEMPLATE_PACKAGE,
    CardFiles,
    LoraFile,
    card_for_pipeline,
    hub_model_id,
    is_generated_card,
    render_model_card,
    save_model_card,
    template_path,
)
from tests.support import REPO

SD14 = "CompVis/stable-diffusion-v1-4"
EDITS = [
    ConceptEdit(erase=("van gogh", "pic|asso"), guide=("art", ""), preserve=("monet", "rembrandt"), erase_scale=1.5,
                preserve_scale=0.25, lamb=0.7, token_mode="paper", technique="tensor"),
    {"erase": ["nudity"], "guide": [""], "preserve": [], "erase_scale": 1.0, "preserve_scale": 1.0, "lamb": 0.7,
     "token_mode": "last", "technique": "replace"},
]
REPORT = {
    "erased": [{"concept": "van gogh", "guide": "art", "efficacy": 0.98}, {"concept": "pic|asso", "guide": "",
                                                                            "efficacy": 0.9},
               {"concept": "nudity", "guide": "", "efficacy": 0.94}],
    "preserved": [{"concept": "monet", "interference": 0.01}, {"concept": "rembrandt", "interference": 0.03}],
    "held_out": [{"concept": "a cat", "interference": 0.002}],
    "layers": 32,
}
# Per demo family: a real base model of the family, its licence, and the family's Hub tags.
BASES = {"sd1": (SD14, "creativeml-openrail-m"), "sd2": ("stabilityai/stable-diffusion-2-1-base", "openrail++"),
         "sdxl": ("stabilityai/stable-diffusion-xl-base-1.0", "openrail++"),
         "flux": ("black-forest-labs/FLUX.1-dev", "other")}
FAMILY_TAGS = {"sd1": {"stable-diffusion", "stable-diffusion-diffusers"},
               "sd2": {"stable-diffusion", "stable-diffusion-diffusers"},
               "sdxl": {"stable-diffusion-xl", "stable-diffusion-xl-diffusers"}, "flux": {"flux", "flux-diffusers"}}
BIBTEX = """@inproceedings{gandikota2024unified,
  title={Unified Concept Editing in Diffusion Models},
  author={Gandikota, Rohit and Orgad, Hadas and Belinkov, Yonatan and Materzy{\\'n}ska, Joanna and Bau, David},
  booktitle={Proceedings of the IEEE/CVF Winter Conference on Applications of Computer Vision},
  pages={5111--5120},
  year={2024}
}"""


def saved(card, tmp_path):
    assert save_model_card(card, tmp_path)
    return ModelCard.load(tmp_path / "README.md")


def table_rows(text, header_start):
    """Cells of the markdown table whose header row starts with `header_start`."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").replace("\\|", "\0").split("|")])
    return [[c.replace("\0", "|") for c in row] for row in rows]


class TestMetadata:
    def test_adapter(self, tmp_path):
        files = CardFiles(edit_file="uce_edits.safetensors", loras=(LoraFile("pytorch_lora_weights.safetensors"),),
                          community_pipeline=True)
        card = saved(render_model_card(edits=EDITS, base_model=SD14, kind="adapter", report=REPORT,
                                       repo_id="me/sd14-uce", files=files), tmp_path)
        data = card.data
        assert data.library_name == "diffusers" and data.pipeline_tag == "text-to-image"
        assert data.base_model == SD14 and data.base_model_relation == "adapter"
        assert data.license == "creativeml-openrail-m"
        assert {"uce", "concept-editing", "lora", "stable-diffusion", "diffusers", "text-to-image"} <= set(data.tags)
        assert 'custom_pipeline="me/sd14-uce", trust_remote_code=True' in card.text
        assert 'pipe.load_concept_edits("me/sd14-uce", weight_name="uce_edits.safetensors")' in card.text
        assert f'diffusers_uce.attach(DiffusionPipeline.from_pretrained("{SD14}"' in card.text
        assert 'pipe.load_lora_weights("me/sd14-uce", weight_name="pytorch_lora_weights.safetensors"' in card.text
        assert BIBTEX in card.text and is_generated_card((tmp_path / "README.md").read_text())

    def test_finetune(self, tmp_path):
        card = saved(render_model_card(edits=EDITS, base_model="stabilityai/stable-diffusion-xl-base-1.0",
                                       kind="finetune", family="stable-diffusion-xl", repo_id="me/sdxl-uce",
                                       extra_tags=["art"]), tmp_path)
        data = card.data
        assert data.base_model == "stabilityai/stable-diffusion-xl-base-1.0"
        assert data.base_model_relation == "finetune" and data.license == "openrail++"
        assert {"uce", "concept-editing", "stable-diffusion-xl", "stable-diffusion-xl-diffusers", "art"} <= set(
            data.tags) and "stable-diffusion" not in data.tags
        assert 'DiffusionPipeline.from_pretrained("me/sdxl-uce"' in card.text
        assert "custom_pipeline" not in card.text and BIBTEX in card.text

    @pytest.mark.parametrize("base, family, expected", [
        ("black-forest-labs/FLUX.1-dev", "flux",
         {"license": "other", "license_name": "flux-1-dev-non-commercial-license"}),
        ("black-forest-labs/FLUX.1-schnell", "flux", {"license": "apache-2.0"}),
        ("stabilityai/stable-diffusion-2-1-base", "stable-diffusion", {"license": "openrail++"}),
        ("stable-diffusion-v1-5/stable-diffusion-v1-5", "stable-diffusion", {"license": "creativeml-openrail-m"}),
        ("someone/unknown-model", "stable-diffusion", {"license": None}),
    ])
    def test_known_base_licences(self, base, family, expected):
        data = render_model_card(edits=EDITS, base_model=base, kind="adapter", family=family).data
        assert {k: getattr(data, k, None) for k in expected} == expected
        if family == "flux":
            assert {"flux", "flux-diffusers"} <= set(data.tags) and "stable-diffusion" not in data.tags
        if expected["license"] == "other":
            assert data.license_link.startswith("https://huggingface.co/black-forest-labs/FLUX.1-dev")

    def test_family_by_name_or_object(self):
        by_name = render_model_card(edits=EDITS, base_model=None, kind="adapter", family="flux")
        assert by_name.text == render_model_card(edits=EDITS, base_model=None, kind="adapter", family=FLUX).text
        assert "`transformer.context_embedder`" in by_name.text and "torch_dtype=torch.bfloat16" in by_name.text
        with pytest.raises(ValueError, match="unknown pipeline family 'kandinsky'.*stable-diffusion-xl, flux"):
            render_model_card(edits=EDITS, base_model=None, kind="adapter", family="kandinsky")

    def test_explicit_licence_wins(self):
        assert render_model_card(edits=[], base_model=SD14, kind="adapter", license="mit").data.license == "mit"

    def test_local_base_path_stays_out_of_metadata(self, tmp_path):
        data = render_model_card(edits=EDITS, base_model=str(tmp_path), kind="adapter").data
        assert data.base_model is None and getattr(data, "base_model_relation", None) is None
        snapshot = "/cache/hub/models--CompVis--stable-diffusion-v1-4/snapshots/0123abcd"
        assert hub_model_id(snapshot) == SD14 and hub_model_id(SD14) == SD14 and hub_model_id(None) is None

    def test_unknown_kind_is_refused(self):
        with pytest.raises(ValueError, match="'adapter'.*'finetune'"):
            render_model_card(edits=EDITS, base_model=SD14, kind="lora")


class TestBody:
    def test_edit_table(self):
        text = render_model_card(edits=EDITS, base_model=SD14, kind="adapter").text
        rows = table_rows(text, "| # | Erased → guide")
        assert rows == [
            ["1", "van gogh → art; pic|asso → *unconditional*", "monet; rembrandt", "1.5", "0.25", "0.7", "paper",
             "tensor"],
            ["2", "nudity → *unconditional*", "—", "1", "1", "0.7", "last", "replace"],
        ]

    def test_report_numbers(self):
        text = render_model_card(edits=EDITS, base_model=SD14, kind="adapter", report=REPORT).text
        summary = dict(row[:2] for row in table_rows(text, "| Metric | Value |"))
        assert summary["Mean efficacy (erased)"] == f"{(0.98 + 0.9 + 0.94) / 3:.4f}"
        assert summary["Mean interference (preserved)"] == "0.0200"
        assert summary["Mean interference (held-out)"] == "0.0020"
        assert summary["Edited projections"] == "32"
        rows = table_rows(text, "| Role | Concept |")
        assert rows[0] == ["erased", "van gogh", "→ art", "efficacy", "0.9800"]
        assert rows[1][:3] == ["erased", "pic|asso", "→ *unconditional*"]
        assert [r[0] for r in rows] == ["erased"] * 3 + ["preserved"] * 2 + ["held-out"]

    def test_long_reports_are_compact(self):
        many = {**REPORT, "held_out": [{"concept": f"thing {i}", "interference": 0.01} for i in range(40)]}
        text = render_model_card(edits=EDITS, base_model=SD14, kind="adapter", report=many).text
        assert len(table_rows(text, "| Role | Concept |")) == 24 and "and 21 more rows" in text

    def test_report_objects_are_accepted(self):
        report = diffusers_uce.EditReport(**REPORT)
        from_object = render_model_card(edits=EDITS, base_model=SD14, kind="adapter", report=report).text
        assert from_object == render_model_card(edits=EDITS, base_model=SD14, kind="adapter", report=REPORT).text

    @pytest.mark.parametrize("kind", ["adapter", "finetune"])
    def test_partial_data_renders(self, kind, tmp_path):
        card = saved(render_model_card(edits=[], base_model=None, kind=kind), tmp_path)
        data = card.data.to_dict()
        assert data["library_name"] == "diffusers" and "uce" in data["tags"]
        assert not {"base_model", "base_model_relation", "license"} & set(data)
        assert "No edit records" in card.text and "## Edit report" not in card.text
        assert "<your-username>/<your-repo>" in card.text and BIBTEX in card.text
        assert "\n\n\n" not in card.text and "{{" not in card.text and "None" not in card.text

    def test_card_for_pipeline(self, tmp_path):
        pipe = diffusers_uce.attach(make_demo_pipeline("sd1"))
        pipe.register_to_config(_name_or_path=SD14)
        out = pipe.apply_concept_edits(erase=["van gogh"], guide="art", preserve=["monet"], layers=["up_blocks"])
        card = saved(card_for_pipeline(pipe, "adapter", report=out.report, repo_id="me/demo"), tmp_path)
        assert card.data.base_model == SD14 and card.data.base_model_relation == "adapter"
        assert "stable-diffusion" in card.data.tags
        assert table_rows(card.text, "| # | Erased → guide")[0][:3] == ["1", "van gogh → art", "monet"]
        assert table_rows(card.text, "| Role | Concept |")[0][:2] == ["erased", "van gogh"]
        assert "`to_k` and `to_v` of the cross-attention layers matching up\\_blocks" in card.text
        assert render_model_card(edits=pipe.concept_edits, base_model=None, kind="finetune").data.base_model is None


class TestEveryFamily:
    """`card_for_pipeline` on an edited pipeline of each family: its base model, licence, tags and edited layers."""

    @pytest.mark.parametrize("kind", ["adapter", "finetune"])
    def test_card_for_pipeline(self, pipe, family, kind, tmp_path):
        base, licence = BASES[family]
        pipe.register_to_config(_name_or_path=base)  # as `from_pretrained(base)` records it
        out = pipe.apply_concept_edits(erase=["van gogh"], guide="art", preserve=["monet"], held_out=[])
        card = saved(card_for_pipeline(pipe, kind, report=out.report, repo_id="me/edited"), tmp_path)
        data = card.data
        assert (data.base_model, data.base_model_relation, data.license) == (base, kind, licence)
        assert data.library_name == "diffusers" and data.pipeline_tag == "text-to-image"
        others = set().union(*FAMILY_TAGS.values()) - FAMILY_TAGS[family]
        assert FAMILY_TAGS[family] | {"diffusers", "text-to-image", "uce", "concept-editing"} <= set(data.tags)
        assert not others & set(data.tags)
        assert table_rows(card.text, "| # | Erased → guide")[0][:3] == ["1", "van gogh → art", "monet"]
        options = next(line for line in card.text.splitlines() if line.startswith("Edited projections:"))
        if family == "flux":
            assert options == ("Edited projections: `transformer.context_embedder`; "
                               "`transformer.time_text_embed.text_embedder.linear_1`; strength 1.")
            assert "cross-attention" not in card.text.split("## How to use")[0]
        else:
            assert options == "Edited projections: `to_k` and `to_v` of every cross-attention layer; strength 1."
        dtype = "bfloat16" if family == "flux" else "float16"
        assert f"torch_dtype=torch.{dtype})" in card.text
        assert (f'from_pretrained("{base}"' in card.text) == (kind == "adapter")


class TestSave:
    def test_existing_readme_is_kept_unless_overwrite(self, tmp_path, caplog):
        card = render_model_card(edits=EDITS, base_model=SD14, kind="adapter")
        readme = tmp_path / "README.md"
        readme.write_text("my own card\n")
        with caplog.at_level(logging.WARNING):
            assert save_model_card(card, tmp_path) is False
        assert readme.read_text() == "my own card\n" and "kept the existing" in caplog.text
        assert save_model_card(card, tmp_path, overwrite=True) is True
        assert readme.read_text(encoding="utf-8") == str(card)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md"]  # no temporary file left

    def test_creates_the_folder(self, tmp_path):
        assert save_model_card("---\nlicense: mit\n---\n# x\n", tmp_path / "a" / "b")
        assert ModelCard.load(tmp_path / "a" / "b" / "README.md").data.license == "mit"


class TestTemplateShipping:
    def test_found_through_importlib_resources(self):
        resource = importlib.resources.files(TEMPLATE_PACKAGE).joinpath(DEFAULT_TEMPLATE)
        assert resource.is_file() and "{{ card_data }}" in resource.read_text(encoding="utf-8")
        # A source checkout renders its own template, even when an editable install of another checkout maps the
        # package elsewhere.
        with template_path() as path:
            assert path.read_text(encoding="utf-8") == (REPO / "model_cards" / DEFAULT_TEMPLATE).read_text("utf-8")

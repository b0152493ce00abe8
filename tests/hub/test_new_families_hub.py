"""The newer families on the Hub (local server, real client) and as community pipelines: an edit pushed from one
pipeline loads onto another from the pushed repository, with the family's tags, its exact LoRA and `pipeline.py`."""

import uuid

import pytest
import torch
from diffusers import DiffusionPipeline
from huggingface_hub import HfApi, ModelCard

import diffusers_uce
from diffusers_uce.demo import make_demo_pipeline
from diffusers_uce.hub.community import build_community_pipeline
from tests.support.helpers import rel, target_layers

TAGS = {"qwenimage": "qwen-image", "hidream": "hidream", "sana": "sana"}


@pytest.mark.parametrize("family", ["qwenimage", "hidream"])
def test_push_and_load_back(family, hub_server, hub_token):
    repo_id = f"user/{family}-edit-{uuid.uuid4().hex[:8]}"
    pipe = diffusers_uce.attach(make_demo_pipeline(family))
    pipe.apply_concept_edits(["van gogh", "picasso"], guide="art", preserve=["monet"], held_out=[])
    pipe.push_concept_edits_to_hub(repo_id, token=hub_token)
    files = set(HfApi(token=hub_token).list_repo_files(repo_id))
    assert {"uce_edits.safetensors", "pytorch_lora_weights.safetensors", "pipeline.py", "README.md"} <= files
    card = ModelCard.load(repo_id, token=hub_token)
    assert TAGS[family] in card.data.tags and "uce" in card.data.tags
    other = diffusers_uce.attach(make_demo_pipeline(family))
    other.load_concept_edits(repo_id, token=hub_token)  # verified against its records
    pipe.fuse_concept_edits()
    other.fuse_concept_edits()
    for (name, a), (_, b) in zip(target_layers(pipe), target_layers(other)):
        assert rel(b.weight, a.weight) < 1e-5, name


def test_community_pipeline_of_a_new_family_edits_like_the_plugin(tmp_path):
    folder, path = tmp_path / "sana", tmp_path / "pipeline_uce_sana.py"
    make_demo_pipeline("sana").save_pretrained(folder)
    path.write_text(build_community_pipeline(pipeline_base="SanaPipeline"), encoding="utf-8")
    pipe = DiffusionPipeline.from_pretrained(folder, custom_pipeline=str(path), trust_remote_code=True)
    assert type(pipe).__name__ == "UCESanaPipeline" and not isinstance(pipe, diffusers_uce.UCEMixin)
    plugin = diffusers_uce.attach(make_demo_pipeline("sana"))
    edit = dict(erase=["van gogh"], guide="art", preserve=["monet"], held_out=[])
    assert pipe.apply_concept_edits(**edit).report.to_dict() == plugin.apply_concept_edits(**edit).report.to_dict()
    pipe.fuse_concept_edits()
    plugin.fuse_concept_edits()
    for (name, a), (_, b) in zip(target_layers(plugin), target_layers(pipe)):
        assert torch.equal(a.weight, b.weight), name

"""Sharing edits through the Hub, with the real huggingface_hub client against the local server (conftest.py)."""

import json
import uuid

import pytest
from diffusers import DiffusionPipeline, StableDiffusionPipeline
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.errors import HfHubHTTPError

import diffusers_uce
from diffusers_uce.demo import make_demo_pipeline
from helpers import rel, unet_output, weights

ERASE = ["van gogh", "picasso"]


@pytest.fixture
def api(hub_server, hub_token):
    return HfApi(endpoint=hub_server.endpoint, token=hub_token)


def new_repo(name="edit"):
    return f"user/{name}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def base_repo(hub_server, hub_token, tmp_path_factory):
    """The tiny SD 1.x pipeline as a Hub model, so edited pipelines know their `base_model`."""
    repo_id = new_repo("tiny-sd")
    folder = tmp_path_factory.mktemp("base")
    make_demo_pipeline("sd1").save_pretrained(folder)
    api = HfApi(token=hub_token)
    api.create_repo(repo_id)
    api.upload_folder(repo_id=repo_id, folder_path=folder)
    return repo_id


def edited(base_repo):
    pipe = diffusers_uce.UCEStableDiffusionPipeline.from_pretrained(base_repo)
    pipe.apply_concept_edits(ERASE, guide="art", preserve=["monet"])
    return pipe


def commits(hub_server):
    return sum(1 for method, path in hub_server.requests if method == "POST" and "/commit/" in path)


def test_push_edit_in_one_commit_and_load_it_back(base_repo, hub_server, api):
    pipe = edited(base_repo)
    expected = unet_output(pipe)
    repo_id, before = new_repo(), commits(hub_server)
    info = pipe.push_concept_edits_to_hub(repo_id, commit_message="erase two artists")
    assert commits(hub_server) == before + 1 and info.commit_message == "erase two artists"
    files = set(api.list_repo_files(repo_id))
    assert {"uce_edits.safetensors", "README.md", "pipeline.py"} <= files
    sha = api.model_info(repo_id, files_metadata=True).siblings
    assert any(s.rfilename == "uce_edits.safetensors" and s.lfs is not None for s in sha)  # went through LFS

    card = ModelCard.load(repo_id)
    assert card.data.base_model == base_repo and card.data.base_model_relation == "adapter"
    assert card.data.library_name == "diffusers" and card.data.pipeline_tag == "text-to-image"
    assert {"uce", "concept-editing", "stable-diffusion"} <= set(card.data.tags)
    assert "van gogh" in card.text and "monet" in card.text and "gandikota2024unified" in card.text

    fresh = diffusers_uce.attach(StableDiffusionPipeline.from_pretrained(base_repo))
    fresh.load_concept_edits(repo_id)
    assert fresh.concept_edits == pipe.concept_edits
    assert rel(unet_output(fresh), expected) < 1e-6


def test_community_pipeline_from_the_edit_repo(base_repo, api):
    pipe = edited(base_repo)
    expected = unet_output(pipe)
    repo_id = new_repo()
    pipe.push_concept_edits_to_hub(repo_id)
    community = DiffusionPipeline.from_pretrained(base_repo, custom_pipeline=repo_id, trust_remote_code=True)
    assert not isinstance(community, diffusers_uce.UCEMixin) and hasattr(community, "apply_concept_edits")
    community.load_concept_edits(repo_id)
    assert rel(unet_output(community), expected) < 1e-6


def test_push_fused_model_loads_without_plugin(base_repo, api, tmp_path):
    pipe = edited(base_repo)
    repo_id = new_repo("full")
    with pytest.raises(ValueError, match="not fused"):
        pipe.push_to_hub(repo_id)
    assert not api.repo_exists(repo_id)  # refused before anything was created
    pipe.fuse_concept_edits()
    expected = unet_output(pipe)
    pipe.push_to_hub(repo_id)
    loaded = DiffusionPipeline.from_pretrained(repo_id)
    assert type(loaded) is StableDiffusionPipeline
    assert rel(unet_output(loaded), expected) < 1e-5
    card = ModelCard.load(repo_id)
    assert card.data.base_model_relation == "finetune" and card.data.base_model == base_repo

    other = new_repo("full")  # the save_pretrained(push_to_hub=True) route too
    pipe.save_pretrained(tmp_path / "out", push_to_hub=True, repo_id=other)
    assert ModelCard.load(other).data.base_model_relation == "finetune"
    assert json.loads((tmp_path / "out" / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"


def test_local_saves_write_cards_and_keep_existing_readme(base_repo, tmp_path):
    pipe = edited(base_repo)
    pipe.save_concept_edits(tmp_path / "edit")
    assert ModelCard.load(tmp_path / "edit" / "README.md").data.base_model_relation == "adapter"
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "README.md").write_text("my own notes")
    pipe.fuse_concept_edits()
    pipe.save_pretrained(tmp_path / "full")
    assert (tmp_path / "full" / "README.md").read_text() == "my own notes"
    pipe.save_pretrained(tmp_path / "full", overwrite_model_card=True)
    assert ModelCard.load(tmp_path / "full" / "README.md").data.base_model_relation == "finetune"


def test_failed_push_changes_nothing(base_repo, hub_server, api, caplog):
    pipe = edited(base_repo)
    repo_id = new_repo()
    pipe.push_concept_edits_to_hub(repo_id)
    head = api.model_info(repo_id).sha
    pipe.apply_concept_edits("dog", guide="cat")
    state = (pipe.concept_edits, weights(pipe), unet_output(pipe))
    hub_server.fail_next("/commit/", status=500)
    with pytest.raises(HfHubHTTPError):
        pipe.push_concept_edits_to_hub(repo_id)
    assert "failed while uploading the edit" in caplog.text
    assert api.model_info(repo_id).sha == head  # the repository is as it was
    assert pipe.concept_edits == state[0] and all((weights(pipe)[n] == w).all() for n, w in state[1].items())
    assert rel(unet_output(pipe), state[2]) == 0


def test_push_as_pull_request_leaves_main(base_repo, api):
    pipe = edited(base_repo)
    repo_id = new_repo()
    api.create_repo(repo_id)
    head = api.model_info(repo_id).sha
    info = pipe.push_concept_edits_to_hub(repo_id, create_pr=True)
    assert info.pr_url and api.model_info(repo_id).sha == head


def test_refused_files_from_the_hub(base_repo, api, tmp_path):
    repo_id = new_repo()
    api.create_repo(repo_id)
    (tmp_path / "uce_edits.bin").write_bytes(b"not loaded")
    api.upload_file(repo_id=repo_id, path_or_fileobj=tmp_path / "uce_edits.bin", path_in_repo="uce_edits.bin")
    pipe = diffusers_uce.attach(make_demo_pipeline("sd2"))
    with pytest.raises(ValueError, match="safetensors"):
        pipe.load_concept_edits(repo_id, weight_name="uce_edits.bin")
    edited(base_repo).push_concept_edits_to_hub(repo_id)  # an SD 1.x edit onto an SD 2.x pipeline
    with pytest.raises(ValueError, match=base_repo):
        pipe.load_concept_edits(repo_id)
    assert pipe.concept_edits == ()

"""Sharing edits through the Hub, with the real huggingface_hub client against the local server (conftest.py).

The round trips (edit repo, community pipeline from it, fused model) run on every family; the failure paths, which
do not depend on the family, on SD 1.x.
"""

import json
import uuid

import pytest
from diffusers import DiffusionPipeline, FluxPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from huggingface_hub import HfApi, ModelCard, hf_hub_download
from huggingface_hub.errors import HfHubHTTPError

import diffusers_uce
from diffusers_uce.demo import make_demo_pipeline
from tests.support.helpers import rel, run_cli, unet_output, weights

ERASE = ["van gogh", "picasso"]
BASE_CLASSES = {"sd1": StableDiffusionPipeline, "sd2": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline,
                "flux": FluxPipeline}
UCE_CLASSES = {"sd1": diffusers_uce.UCEStableDiffusionPipeline, "sd2": diffusers_uce.UCEStableDiffusionPipeline,
               "sdxl": diffusers_uce.UCEStableDiffusionXLPipeline, "flux": diffusers_uce.UCEFluxPipeline}
FAMILY_TAG = {"sd1": "stable-diffusion", "sd2": "stable-diffusion", "sdxl": "stable-diffusion-xl", "flux": "flux"}


@pytest.fixture
def api(hub_server, hub_token):
    return HfApi(endpoint=hub_server.endpoint, token=hub_token)


def new_repo(name="edit"):
    return f"user/{name}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def base_models(hub_server, hub_token, tmp_path_factory):
    """`get(family)`: (Hub repo id, local folder) of the family's tiny pipeline, uploaded once per module, so edited
    pipelines know their `base_model`."""
    made = {}

    def get(family):
        if family not in made:
            repo_id, folder = new_repo(f"tiny-{family}"), tmp_path_factory.mktemp(f"base-{family}")
            make_demo_pipeline(family).save_pretrained(folder)
            api = HfApi(token=hub_token)
            api.create_repo(repo_id)
            api.upload_folder(repo_id=repo_id, folder_path=folder)
            made[family] = repo_id, folder
        return made[family]

    return get


@pytest.fixture
def base_repo(base_models, family):
    return base_models(family)[0]


@pytest.fixture
def sd1_repo(base_models):
    return base_models("sd1")[0]


def edited(base_repo, family="sd1"):
    """The family's ready UCE class loaded from the Hub, with one edit applied."""
    pipe = UCE_CLASSES[family].from_pretrained(base_repo)
    pipe.apply_concept_edits(ERASE, guide="art", preserve=["monet"], held_out=[])
    return pipe


def commits(hub_server):
    return sum(1 for method, path in hub_server.requests if method == "POST" and "/commit/" in path)


def pipeline_class_of(path):
    """The header of the last class a community pipeline file defines (its pipeline class)."""
    return open(path, encoding="utf-8").read().rsplit("\nclass ", 1)[1].split(":", 1)[0]


def test_push_edit_in_one_commit_and_load_it_back(family, base_repo, hub_server, api):
    pipe = edited(base_repo, family)
    expected = unet_output(pipe)
    repo_id, before = new_repo(), commits(hub_server)
    info = pipe.push_concept_edits_to_hub(repo_id, commit_message="erase two artists")
    assert commits(hub_server) == before + 1 and info.commit_message == "erase two artists"
    files = set(api.list_repo_files(repo_id))
    assert {"uce_edits.safetensors", "README.md", "pipeline.py"} <= files
    sha = api.model_info(repo_id, files_metadata=True).siblings
    assert any(s.rfilename == "uce_edits.safetensors" and s.lfs is not None for s in sha)  # went through LFS
    base = BASE_CLASSES[family].__name__  # the community pipeline of the family, for custom_pipeline=repo_id
    assert pipeline_class_of(hf_hub_download(repo_id, "pipeline.py")) == f"UCE{base}(UCEMixin, {base})"

    card = ModelCard.load(repo_id)
    assert card.data.base_model == base_repo and card.data.base_model_relation == "adapter"
    assert card.data.library_name == "diffusers" and card.data.pipeline_tag == "text-to-image"
    assert {"uce", "concept-editing", FAMILY_TAG[family], f"{FAMILY_TAG[family]}-diffusers"} <= set(card.data.tags)
    assert "van gogh" in card.text and "monet" in card.text and "gandikota2024unified" in card.text

    fresh = diffusers_uce.attach(DiffusionPipeline.from_pretrained(base_repo))
    assert type(fresh)._uce_family is type(pipe)._uce_family
    fresh.load_concept_edits(repo_id)
    assert fresh.concept_edits == pipe.concept_edits
    assert rel(unet_output(fresh), expected) < 1e-6


def test_community_pipeline_from_the_edit_repo(family, base_models):
    base_repo, base_folder = base_models(family)
    pipe = edited(base_repo, family)
    repo_id = new_repo()
    pipe.push_concept_edits_to_hub(repo_id)
    community = DiffusionPipeline.from_pretrained(base_folder, custom_pipeline=repo_id, trust_remote_code=True)
    base = BASE_CLASSES[family]
    assert type(community).__name__ == f"UCE{base.__name__}" and isinstance(community, base)
    assert not isinstance(community, diffusers_uce.UCEMixin)  # the file's own copy of the code, from the repo:
    assert repo_id.replace("/", "--") in type(community).__module__
    community.load_concept_edits(repo_id)
    assert [e.to_dict() for e in community.concept_edits] == [e.to_dict() for e in pipe.concept_edits]
    # ...and it edits further like the plugin does.
    theirs = community.apply_concept_edits("dog", guide="cat", held_out=[])
    ours = pipe.apply_concept_edits("dog", guide="cat", held_out=[])
    assert theirs.report.to_dict() == ours.report.to_dict() and len(community.concept_edits) == 2
    assert rel(unet_output(community), unet_output(pipe)) < 1e-6


def test_push_fused_model_loads_without_plugin(family, base_repo, api, tmp_path):
    pipe = edited(base_repo, family)
    repo_id = new_repo("full")
    with pytest.raises(ValueError, match="not fused"):
        pipe.push_to_hub(repo_id)
    assert not api.repo_exists(repo_id)  # refused before anything was created
    pipe.fuse_concept_edits()
    expected, edited_weights = unet_output(pipe), weights(pipe)
    pipe.push_to_hub(repo_id)
    base = BASE_CLASSES[family]
    loaded = DiffusionPipeline.from_pretrained(repo_id)
    assert type(loaded) is base
    assert all(w.equal(edited_weights[n]) for n, w in weights(loaded).items())
    assert rel(unet_output(loaded), expected) < 1e-5
    card = ModelCard.load(repo_id)
    assert card.data.base_model_relation == "finetune" and card.data.base_model == base_repo
    assert FAMILY_TAG[family] in card.data.tags

    other = new_repo("full")  # the save_pretrained(push_to_hub=True) route too
    pipe.save_pretrained(tmp_path / "out", push_to_hub=True, repo_id=other)
    assert ModelCard.load(other).data.base_model_relation == "finetune"
    assert json.loads((tmp_path / "out" / "model_index.json").read_text())["_class_name"] == base.__name__


def test_local_saves_write_cards_and_keep_existing_readme(family, base_repo, tmp_path):
    pipe = edited(base_repo, family)
    pipe.save_concept_edits(tmp_path / "edit")
    card = ModelCard.load(tmp_path / "edit" / "README.md")
    assert card.data.base_model_relation == "adapter" and FAMILY_TAG[family] in card.data.tags
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "README.md").write_text("my own notes")
    pipe.fuse_concept_edits()
    pipe.save_pretrained(tmp_path / "full")
    assert (tmp_path / "full" / "README.md").read_text() == "my own notes"
    pipe.save_pretrained(tmp_path / "full", overwrite_model_card=True)
    card = ModelCard.load(tmp_path / "full" / "README.md")
    assert card.data.base_model_relation == "finetune" and card.data.base_model == base_repo


def test_failed_push_changes_nothing(sd1_repo, hub_server, api, caplog):
    pipe = edited(sd1_repo)
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


def test_push_as_pull_request_leaves_main(sd1_repo, api):
    pipe = edited(sd1_repo)
    repo_id = new_repo()
    api.create_repo(repo_id)
    head = api.model_info(repo_id).sha
    info = pipe.push_concept_edits_to_hub(repo_id, create_pr=True)
    assert info.pr_url and api.model_info(repo_id).sha == head


def test_refused_files_from_the_hub(base_models, api, tmp_path):
    sd1_repo, sdxl_repo = base_models("sd1")[0], base_models("sdxl")[0]
    repo_id = new_repo()
    api.create_repo(repo_id)
    (tmp_path / "uce_edits.bin").write_bytes(b"not loaded")
    api.upload_file(repo_id=repo_id, path_or_fileobj=tmp_path / "uce_edits.bin", path_in_repo="uce_edits.bin")
    pipe = diffusers_uce.attach(make_demo_pipeline("sd2"))
    with pytest.raises(ValueError, match="safetensors"):
        pipe.load_concept_edits(repo_id, weight_name="uce_edits.bin")
    edited(sd1_repo).push_concept_edits_to_hub(repo_id)  # an SD 1.x edit onto an SD 2.x pipeline
    with pytest.raises(ValueError, match=sd1_repo):
        pipe.load_concept_edits(repo_id)
    sdxl_edit = new_repo()
    edited(sdxl_repo, "sdxl").push_concept_edits_to_hub(sdxl_edit)  # an SDXL edit onto a FLUX pipeline
    flux = diffusers_uce.attach(make_demo_pipeline("flux"))
    with pytest.raises(ValueError, match=sdxl_repo):
        flux.load_concept_edits(sdxl_edit)
    assert pipe.concept_edits == () and flux.concept_edits == ()


# --- a card already on the Hub, and pushes that fail ---------------------------------------------------------------

@pytest.mark.parametrize("route", ["edit", "fused", "cli"])
def test_push_keeps_a_readme_already_on_the_hub(sd1_repo, api, tmp_path, route):
    """A README.md the user put on the Hub survives a push, unless overwrite_model_card=True."""
    pipe = edited(sd1_repo)
    repo_id = new_repo()
    api.create_repo(repo_id)
    api.upload_file(path_or_fileobj=b"# MY README", path_in_repo="README.md", repo_id=repo_id)

    def push(overwrite):
        if route == "edit":
            return pipe.push_concept_edits_to_hub(repo_id, overwrite_model_card=overwrite)
        if route == "fused":
            return pipe.push_to_hub(repo_id, fuse_concept_edits=True, overwrite_model_card=overwrite)
        folder = tmp_path / f"saved-{overwrite}"
        pipe.save_concept_edits(folder)
        code, _, err = run_cli("push", folder, repo_id, *(["--overwrite-model-card"] if overwrite else []))
        assert code == 0, err

    push(False)
    files = set(api.list_repo_files(repo_id))
    assert {"README.md", "model_index.json" if route == "fused" else "uce_edits.safetensors"} <= files
    assert open(hf_hub_download(repo_id, "README.md", force_download=True)).read() == "# MY README"
    push(True)
    card = ModelCard.load(hf_hub_download(repo_id, "README.md", force_download=True))
    assert "uce" in card.data.tags


def test_failed_push_deletes_the_repository_it_created(sd1_repo, hub_server, api, caplog):
    pipe = edited(sd1_repo)
    repo_id = new_repo()
    hub_server.fail_next("/commit/", status=500)
    with pytest.raises(HfHubHTTPError):
        pipe.push_concept_edits_to_hub(repo_id)
    assert not api.repo_exists(repo_id)
    assert f"the repository {repo_id} it had created was deleted again" in caplog.text

"""Tests of tests/hub_server.py with the REAL huggingface_hub client (and diffusers) - no mocks."""

import hashlib
import json
import re
import uuid
from pathlib import Path

import httpx2
import pytest
import torch
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from safetensors.torch import save_file


@pytest.fixture
def api(hub_server, hub_token):
    return HfApi(endpoint=hub_server.endpoint, token=hub_token)


@pytest.fixture
def repo_id(request):
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", request.node.name)[:60]
    return f"user/{name}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def model_folder(tmp_path):
    folder = tmp_path / "model"
    (folder / "sub").mkdir(parents=True)
    save_file({"w": torch.arange(12, dtype=torch.float32).reshape(3, 4)}, folder / "model.safetensors")
    (folder / "README.md").write_text("---\nlicense: mit\n---\n# tiny model\n")
    (folder / "config.json").write_text(json.dumps({"hidden": 4}))
    (folder / "sub" / "notes.txt").write_text("nested file\n")
    return folder


def _count(hub_server, method, fragment):
    return sum(1 for m, path in hub_server.requests if m == method and fragment in path)


def test_whoami_and_create_repo(api, hub_server, repo_id):
    assert api.whoami()["name"] == "user"
    url = api.create_repo(repo_id, private=True)
    assert url.repo_id == repo_id and url.startswith(hub_server.endpoint)
    assert api.create_repo(repo_id, private=True, exist_ok=True).repo_id == repo_id
    with pytest.raises(HfHubHTTPError) as exc_info:
        api.create_repo(repo_id)
    assert exc_info.value.response.status_code == 409
    info = api.model_info(repo_id)
    assert info.private is True and re.fullmatch(r"[0-9a-f]{40}", info.sha)
    assert [s.rfilename for s in info.siblings] == [".gitattributes"]  # like the real Hub
    assert api.list_repo_refs(repo_id).branches[0].target_commit == info.sha


def test_upload_folder_is_one_commit_with_lfs(api, hub_server, repo_id, model_folder):
    api.create_repo(repo_id)
    commits_before = _count(hub_server, "POST", f"/api/models/{repo_id}/commit/")
    commit = api.upload_folder(repo_id=repo_id, folder_path=model_folder, commit_message="add model")
    assert _count(hub_server, "POST", f"/api/models/{repo_id}/commit/") == commits_before + 1
    assert commit.oid == hub_server.ref(repo_id) == api.model_info(repo_id).sha

    weights = (model_folder / "model.safetensors").read_bytes()
    sha256 = hashlib.sha256(weights).hexdigest()
    assert hub_server.file_info(repo_id, "model.safetensors")["lfs"] == sha256  # went through LFS ...
    assert (repo_id, sha256) in hub_server.lfs_uploads  # ... with an actual LFS PUT
    assert hub_server.file_info(repo_id, "README.md")["lfs"] is None
    assert hub_server.file_info(repo_id, "config.json")["lfs"] is None

    info = api.model_info(repo_id)
    siblings = {s.rfilename: s for s in info.siblings}
    assert set(siblings) == {".gitattributes", "README.md", "config.json", "model.safetensors", "sub/notes.txt"}
    assert siblings["model.safetensors"].lfs.sha256 == sha256
    assert siblings["model.safetensors"].size == len(weights)
    assert sorted(api.list_repo_files(repo_id)) == sorted(siblings)
    assert api.file_exists(repo_id, "sub/notes.txt") and not api.file_exists(repo_id, "nope.txt")
    tree = {e.path for e in api.list_repo_tree(repo_id)}  # non-recursive: folders are listed, not their files
    assert tree == {".gitattributes", "README.md", "config.json", "model.safetensors", "sub"}
    assert [e.path for e in api.list_repo_tree(repo_id, path_in_repo="sub")] == ["sub/notes.txt"]
    assert [p.path for p in api.get_paths_info(repo_id, ["config.json", "sub"])] == ["config.json", "sub"]

    # Re-uploading identical content creates no new commit (the preupload endpoint returns the remote oids).
    again = api.upload_folder(repo_id=repo_id, folder_path=model_folder)
    assert again.oid == commit.oid


def test_download_cache_and_snapshot(api, hub_server, repo_id, model_folder, tmp_path):
    api.create_repo(repo_id)
    commit = api.upload_folder(repo_id=repo_id, folder_path=model_folder)
    weights = (model_folder / "model.safetensors").read_bytes()

    path = hf_hub_download(repo_id, "model.safetensors")
    assert Path(path).read_bytes() == weights
    assert Path(path).resolve().name == hashlib.sha256(weights).hexdigest()  # blob named by the LFS sha256
    gets = _count(hub_server, "GET", f"/{repo_id}/resolve/")
    assert hf_hub_download(repo_id, "model.safetensors") == path
    assert _count(hub_server, "GET", f"/{repo_id}/resolve/") == gets  # second download served from the cache
    assert Path(hf_hub_download(repo_id, "sub/notes.txt", revision=commit.oid)).read_text() == "nested file\n"

    # Ranged GET (what the client uses to resume downloads).
    url = f"{hub_server.endpoint}/{repo_id}/resolve/main/model.safetensors"
    response = httpx2.get(url, headers={"Range": "bytes=8-"})
    assert response.status_code == 206 and response.content == weights[8:]

    folder = Path(snapshot_download(repo_id, cache_dir=tmp_path / "cache"))
    assert folder.name == commit.oid
    assert (folder / "model.safetensors").read_bytes() == weights
    assert (folder / "sub" / "notes.txt").read_text() == "nested file\n"
    assert json.loads((folder / "config.json").read_text()) == {"hidden": 4}


def test_create_pr_leaves_main_unchanged(api, hub_server, repo_id, model_folder):
    api.create_repo(repo_id)
    main_sha = api.upload_folder(repo_id=repo_id, folder_path=model_folder).oid
    new_weights = model_folder / "model2.safetensors"
    save_file({"w": torch.ones(2)}, new_weights)
    commit = api.create_commit(
        repo_id,
        operations=[
            CommitOperationAdd("config.json", b'{"hidden": 8}'),
            CommitOperationAdd("model.safetensors", new_weights),
            CommitOperationDelete("sub/notes.txt"),
        ],
        commit_message="update via PR",
        create_pr=True,
    )
    assert commit.pr_revision == "refs/pr/1" and commit.pr_num == 1
    assert commit.pr_url == f"{hub_server.endpoint}/{repo_id}/discussions/1"
    assert hub_server.ref(repo_id) == api.model_info(repo_id).sha == main_sha
    assert hub_server.ref(repo_id, "refs/pr/1") == commit.oid != main_sha

    assert json.loads(Path(hf_hub_download(repo_id, "config.json")).read_text()) == {"hidden": 4}
    pr_config = hf_hub_download(repo_id, "config.json", revision="refs/pr/1")
    assert json.loads(Path(pr_config).read_text()) == {"hidden": 8}
    pr_weights = hf_hub_download(repo_id, "model.safetensors", revision="refs/pr/1")
    assert Path(pr_weights).read_bytes() == new_weights.read_bytes()
    assert "sub/notes.txt" in api.list_repo_files(repo_id)
    assert "sub/notes.txt" not in api.list_repo_files(repo_id, revision="refs/pr/1")
    refs = api.list_repo_refs(repo_id, include_pull_requests=True)
    assert [(r.ref, r.target_commit) for r in refs.pull_requests] == [("refs/pr/1", commit.oid)]


def test_fail_next_commit_leaves_repo_unchanged(api, hub_server, repo_id, model_folder):
    api.create_repo(repo_id)
    sha = hub_server.ref(repo_id)
    hub_server.fail_next("/commit/", status=500)
    with pytest.raises(HfHubHTTPError) as exc_info:
        api.upload_folder(repo_id=repo_id, folder_path=model_folder)
    assert exc_info.value.response.status_code == 500
    assert hub_server.ref(repo_id) == sha and api.list_repo_files(repo_id) == [".gitattributes"]
    # The failure was consumed: the same push now goes through (the LFS object is already uploaded).
    uploads = len(hub_server.lfs_uploads)
    assert api.upload_folder(repo_id=repo_id, folder_path=model_folder).oid == hub_server.ref(repo_id) != sha
    assert len(hub_server.lfs_uploads) == uploads


def test_fail_next_lfs_upload_leaves_repo_unchanged(api, hub_server, repo_id, model_folder):
    api.create_repo(repo_id)
    sha = hub_server.ref(repo_id)
    # 5xx on LFS PUTs are retried by the client with backoff: use a non-retried status to fail fast.
    hub_server.fail_next("/lfs-objects/", status=403)
    with pytest.raises(Exception) as exc_info:
        api.upload_folder(repo_id=repo_id, folder_path=model_folder)
    # huggingface_hub wraps LFS upload errors in a RuntimeError("Error while uploading ...") from HfHubHTTPError.
    error, chain = exc_info.value, []
    while error is not None:
        chain.append(error)
        error = error.__cause__
    http_errors = [e for e in chain if isinstance(e, HfHubHTTPError)]
    assert http_errors and http_errors[0].response.status_code == 403
    assert hub_server.ref(repo_id) == sha and api.list_repo_files(repo_id) == [".gitattributes"]


def test_dataset_repo_large_file_and_chunked_upload(api, hub_server, repo_id):
    api.create_repo(repo_id, repo_type="dataset")
    big = b"\1" * (hub_server.LFS_THRESHOLD + 1)  # > 10 MB: LFS whatever the extension
    api.upload_file(path_or_fileobj=big, path_in_repo="data/big.dat", repo_id=repo_id, repo_type="dataset")
    assert hub_server.file_info(repo_id, "data/big.dat", repo_type="dataset")["lfs"] == hashlib.sha256(big).hexdigest()
    assert Path(hf_hub_download(repo_id, "data/big.dat", repo_type="dataset")).read_bytes() == big
    assert api.dataset_info(repo_id).sha == hub_server.ref(repo_id, repo_type="dataset")

    # LFS PUT with a chunked body (what httpx2 sends for a file object of unknown length).
    payload = b"chunked payload"
    oid = hashlib.sha256(payload).hexdigest()
    url = f"{hub_server.endpoint}/lfs-objects/datasets/{repo_id}/{oid}"
    assert httpx2.put(url, content=iter([payload[:7], payload[7:]])).status_code == 200
    assert httpx2.put(url, content=b"wrong content").status_code == 400


def test_missing_entry_repo_and_revision(api, hub_server, repo_id):
    api.create_repo(repo_id)
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(repo_id, "missing.bin")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(repo_id, ".gitattributes", revision="no-such-branch")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("user/does-not-exist", "config.json")
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("user/does-not-exist")


def test_diffusers_push_to_hub_and_from_pretrained(hub_server, hub_token, repo_id):
    from diffusers import DDPMPipeline, DDPMScheduler, DiffusionPipeline, UNet2DConditionModel, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
        norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
    )
    pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=10))
    pipe.push_to_hub(repo_id, token=hub_token)
    assert hub_server.file_info(repo_id, "unet/diffusion_pytorch_model.safetensors")["lfs"]

    loaded = DiffusionPipeline.from_pretrained(repo_id)
    assert isinstance(loaded, DDPMPipeline)
    for name, tensor in unet.state_dict().items():
        torch.testing.assert_close(loaded.unet.state_dict()[name], tensor)
    assert loaded.scheduler.config.num_train_timesteps == 10

    cond_repo = repo_id + "-cond"
    cond_unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        norm_num_groups=4, cross_attention_dim=8, attention_head_dim=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )
    cond_unet.push_to_hub(cond_repo, token=hub_token)
    reloaded = UNet2DConditionModel.from_pretrained(cond_repo)
    for name, tensor in cond_unet.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[name], tensor)

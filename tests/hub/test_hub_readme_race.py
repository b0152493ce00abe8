"""A README.md committed by another writer between the push's README check and its commit is not overwritten: the
commit names the revision it checked (`parent_commit`), the Hub refuses it (412) when another commit came first, and
the push checks again and retries once."""

import pytest
from huggingface_hub import HfApi, hf_hub_download

from diffusers_uce.hub import hub_mixin
from tests.hub.test_hub import base_models, edited, new_repo  # noqa: F401 (base_models: a fixture)


@pytest.fixture
def api(hub_server, hub_token):
    return HfApi(endpoint=hub_server.endpoint, token=hub_token)


@pytest.mark.parametrize("route", ["edit", "fused"])
def test_a_readme_committed_during_the_push_is_kept(base_models, api,  # noqa: F811
                                                   monkeypatch, caplog, route):
    pipe = edited(base_models("sd1")[0])
    repo_id = new_repo()
    api.create_repo(repo_id)
    real, calls = hub_mixin._keeps_remote_card, []

    def then_another_writer_commits(*args, **kwargs):
        keep = real(*args, **kwargs)
        if not calls:  # after our check, before our commit
            api.upload_file(path_or_fileobj=b"# THEIR README", path_in_repo="README.md", repo_id=repo_id)
        calls.append(keep)
        return keep

    monkeypatch.setattr(hub_mixin, "_keeps_remote_card", then_another_writer_commits)
    if route == "edit":
        pipe.push_concept_edits_to_hub(repo_id)
    else:
        pipe.push_to_hub(repo_id, fuse_concept_edits=True)
    assert calls == [False, True]  # checked again after the conflict, and kept this time
    assert open(hf_hub_download(repo_id, "README.md", force_download=True)).read() == "# THEIR README"
    assert "uce_edits.safetensors" in api.list_repo_files(repo_id) or route == "fused"
    assert "changed while this push checked its README.md" in caplog.text


def test_the_local_hub_refuses_a_stale_parent_commit(api):
    """What the push relies on, as the Hub does it: a commit whose parent is not the head is refused with 412."""
    from huggingface_hub import CommitOperationAdd
    from huggingface_hub.errors import HfHubHTTPError

    repo_id = new_repo()
    api.create_repo(repo_id)
    head = api.repo_info(repo_id).sha
    api.upload_file(path_or_fileobj=b"x", path_in_repo="a.txt", repo_id=repo_id)
    with pytest.raises(HfHubHTTPError) as error:
        api.create_commit(repo_id, [CommitOperationAdd("b.txt", b"y")], commit_message="m", parent_commit=head)
    assert error.value.response.status_code == 412

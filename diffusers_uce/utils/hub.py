"""Offline-aware Hub loading: decide within seconds whether a model can come from the Hub, and say what to pass
instead when it cannot, rather than letting a download retry for minutes."""

from __future__ import annotations

import os


def local_files_only_for(repo_id: str | os.PathLike, *, what: str, instead: str, filename: str = "config.json",
                         revision: str | None = None, cache_dir: str | os.PathLike | None = None,
                         timeout: float = 5.0) -> bool:
    r"""Whether `repo_id` must be loaded with `local_files_only=True`.

    A local folder, `HF_HUB_OFFLINE=1` and a Hub that does not answer within `timeout` seconds all mean "load from
    disk" (`True`); a Hub that answers (even with an error such as an unknown repository, which `from_pretrained`
    then reports) means `False`. When the files must come from disk but `filename` of `repo_id` is not in the cache,
    a `ConnectionError` is raised at once with one line saying what to pass instead.

    Args:
        repo_id (`str` or `os.PathLike`): a Hub repo id or a local folder.
        what (`str`): what is loaded, for the message, e.g. `"--model"` or `"the CLIP model"`.
        instead (`str`): what to do offline, for the message, e.g. `"give a local folder"`.
        filename (`str`, defaults to `"config.json"`): a file every copy of the repository has, looked up in the cache.
        revision (`str`, *optional*), cache_dir (`str`, *optional*): as `from_pretrained` takes them.
        timeout (`float`, defaults to 5.0): seconds to wait for the Hub.

    Returns:
        `bool`: the `local_files_only` to load with.
    """
    from huggingface_hub import HfApi, constants, try_to_load_from_cache
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(str(repo_id))
    except HFValidationError:
        return False  # not a Hub id (a path): from_pretrained reports a missing folder itself
    if os.path.isdir(repo_id):
        return False  # a folder: nothing is downloaded

    reason = "HF_HUB_OFFLINE is set"
    if not constants.HF_HUB_OFFLINE:
        try:
            HfApi().model_info(str(repo_id), revision=revision, timeout=timeout)
            return False
        except HfHubHTTPError:  # the Hub answered (unknown repo, gated...): from_pretrained says what is wrong
            return False
        except Exception as error:  # noqa: BLE001 - no answer: offline, a proxy, or the Hub is down
            reason = f"the Hugging Face Hub cannot be reached ({type(error).__name__}: {error})"
    cached = try_to_load_from_cache(str(repo_id), filename, cache_dir=cache_dir, revision=revision)
    if isinstance(cached, str):
        from diffusers.utils import logging

        logging.get_logger(__name__).warning(f"{reason}; loading {what} {repo_id} from the local cache")
        return True
    raise ConnectionError(f"{what} {repo_id}: {reason} and it is not in the local cache: {instead}")

"""Atomic file writes: a reader never sees a half-written file, a failure leaves nothing behind, and a file that must
not be overwritten is created exclusively."""

from __future__ import annotations

import os
import shutil
import uuid
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator, Mapping

if TYPE_CHECKING:
    import torch

    from .safetensors_io import TensorSource

# Files that unpickle when loaded: never read, never written.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


_TMP_SUFFIX = ".tmp"


_ASIDE = "old"  # tag of a folder moved aside while a new one takes its place (`folders.atomic_folder`)


def _temporary_name(path: str, tag: str = "") -> str:
    """A hidden temporary file next to `path` that names its writer: ``.<name>.<pid>.<tag><random>.tmp``."""
    return os.path.join(os.path.dirname(path) or ".",
                        f".{os.path.basename(path)}.{os.getpid()}.{tag}{uuid.uuid4().hex}{_TMP_SUFFIX}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (another user's), or cannot tell: keep its file
    return True


def remove_stale_temporaries(folder: str | os.PathLike) -> list[str]:
    """Remove the temporary files (and folders) that writers killed mid-write left in `folder` (those whose process
    is gone). A folder a killed writer had moved aside to put a new one in its place, where neither is there any more,
    is moved back instead.

    Returns:
        `list[str]`: the files removed.
    """
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        parts = name.split(".")
        if not (name.startswith(".") and name.endswith(_TMP_SUFFIX) and len(parts) >= 5 and parts[-3].isdigit()):
            continue
        if int(parts[-3]) == os.getpid() or _alive(int(parts[-3])):
            continue
        stale, original = os.path.join(folder, name), os.path.join(folder, ".".join(parts[1:-3]))
        if parts[-2].startswith(_ASIDE) and os.path.isdir(stale) and not os.path.lexists(original):
            try:
                os.rename(stale, original)
            except OSError:
                pass
            continue
        try:
            shutil.rmtree(stale) if os.path.isdir(stale) and not os.path.islink(stale) else os.remove(stale)
            removed.append(name)
        except OSError:
            pass
    return removed


def _fsync_folder(folder: str) -> None:
    try:  # make the rename itself durable (POSIX)
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


@contextmanager
def atomic_path(path: str | os.PathLike, *, overwrite: bool = True) -> Iterator[str]:
    """Yield a temporary path next to `path`; when the block succeeds, fsync it and move it into place.

    On any failure (including in the block) the temporary file is removed and `path` is left as it was. With
    `overwrite=False` the file is created exclusively: if `path` exists when the file is moved into place (another
    writer came first), a `FileExistsError` is raised and the other writer's file is kept.

    Example:
    ```py
    >>> with atomic_path("out/report.json") as tmp:
    ...     Path(tmp).write_text("{}")
    ```
    """
    path = os.fspath(path)
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    remove_stale_temporaries(folder)
    tmp = _temporary_name(path)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # fails if `path` exists: no check-then-rename race
            except FileExistsError:
                raise FileExistsError(f"{path} already exists (written by another process meanwhile?): pass "
                                      "overwrite=True to replace it, or choose another name") from None
            os.remove(tmp)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_folder(folder)


@contextmanager
def folder_lock(folder: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on `folder` for the block: writers that replace folders inside it
    (`folders.atomic_folder`) take turns. The lock is taken on the folder itself (no lock file is left); where that
    is not possible the block runs unlocked."""
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    try:
        import fcntl

        fd = os.open(folder, os.O_RDONLY)
    except (ImportError, OSError):  # not POSIX, or a folder that cannot be opened
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def write_text_atomic(path: str | os.PathLike, text: str, *, overwrite: bool = True) -> None:
    """Write `text` (UTF-8, "\\n" line ends) to `path` atomically (exclusively with `overwrite=False`)."""
    with atomic_path(path, overwrite=overwrite) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)


def refuse_existing(path: str | os.PathLike, overwrite: bool, instead: str = "choose another name") -> None:
    """Raise a `FileExistsError` that names `overwrite=True` (and `instead`, the other way out) if `path` exists and
    `overwrite` is not set: the early check of a writer that must not replace a file silently."""
    if not overwrite and os.path.exists(path):
        raise FileExistsError(f"{os.fspath(path)} already exists: pass overwrite=True to replace it, or {instead}")


def check_weight_name(weight_name: str) -> str:
    """Validate a file name to write: a plain name ending in ``.safetensors``."""
    if not isinstance(weight_name, str) or not weight_name.endswith(".safetensors"):
        raise ValueError(f"weight_name must end in '.safetensors' (only safetensors files are written), got "
                         f"{weight_name!r}")
    if os.path.basename(weight_name) != weight_name or weight_name in (".safetensors",):
        raise ValueError(f"weight_name must be a file name such as 'uce_edits.safetensors', got {weight_name!r}: "
                         "put folders in save_directory")
    return weight_name


def atomic_save_safetensors(
    tensors: Mapping[str, TensorSource], save_directory: str | os.PathLike, weight_name: str,
    metadata: dict[str, str], overwrite: bool = False, dtype: torch.dtype | None = None,
) -> str:
    """Write a safetensors file atomically: a temporary file of ours in the same folder, fsync, then moved into place.

    The tensors are written one at a time from their own memory (`safetensors_io.write_safetensors`), so extra host
    memory stays about one tensor; each floating-point tensor is checked finite (after the cast to `dtype`) before
    anything is written. A failure leaves neither a partial file nor the temporary file (a writer killed midway
    leaves a hidden temporary that the next save into the folder removes), and an existing file is only replaced
    when `overwrite` is `True`: otherwise the file is created exclusively, so of two writers racing for a new name
    one gets a `FileExistsError` and the other's file stays.

    Args:
        tensors (`Mapping[str, torch.Tensor or callable]`): the tensors (or functions that make them) to write.
        save_directory (`str` or `os.PathLike`): the folder, created if needed.
        weight_name (`str`): the file name (ends in ``.safetensors``).
        metadata (`dict[str, str]`): the safetensors header metadata.
        overwrite (`bool`, defaults to `False`): replace an existing file.
        dtype (`torch.dtype`, *optional*): cast floating-point tensors to it while writing.

    Returns:
        `str`: the path written.
    """
    from .safetensors_io import plan_safetensors, write_safetensors  # here: the command line must start fast

    check_weight_name(weight_name)
    save_directory = os.fspath(save_directory)
    if os.path.isfile(save_directory):
        raise ValueError(f"save_directory {save_directory!r} is a file; give a folder to write {weight_name} into")
    path = os.path.join(save_directory, weight_name)
    refuse_existing(path, overwrite, "another weight_name")
    plan = plan_safetensors(tensors, dtype)  # every check before the first byte
    with atomic_path(path, overwrite=overwrite) as tmp:
        with open(tmp, "wb") as f:
            write_safetensors(f, tensors, metadata, dtype, plan)
    return path

"""Atomic file writes: a reader never sees a half-written file, and a failure leaves nothing behind."""

from __future__ import annotations

import os
import uuid
from contextlib import contextmanager
from typing import Iterator

import safetensors.torch
import torch

# Files that unpickle when loaded: never read, never written.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path next to `path`; when the block succeeds, fsync it and move it into place.

    On any failure (including in the block) the temporary file is removed and `path` is left as it was.

    Example:
    ```py
    >>> with atomic_path("out/report.json") as tmp:
    ...     Path(tmp).write_text("{}")
    ```
    """
    path = os.fspath(path)
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    try:  # make the rename itself durable (POSIX)
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8, "\\n" line ends) to `path` atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)


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
    tensors: dict[str, torch.Tensor], save_directory: str | os.PathLike, weight_name: str,
    metadata: dict[str, str], overwrite: bool = False,
) -> str:
    """Write a safetensors file atomically: a temporary file in the same folder, fsync, then `os.replace`.

    A failure leaves neither a partial file nor the temporary file, and an existing file is only replaced when
    `overwrite` is `True`.

    Args:
        tensors (`dict[str, torch.Tensor]`): the tensors to write.
        save_directory (`str` or `os.PathLike`): the folder, created if needed.
        weight_name (`str`): the file name (ends in ``.safetensors``).
        metadata (`dict[str, str]`): the safetensors header metadata.
        overwrite (`bool`, defaults to `False`): replace an existing file.

    Returns:
        `str`: the path written.
    """
    check_weight_name(weight_name)
    save_directory = os.fspath(save_directory)
    if os.path.isfile(save_directory):
        raise ValueError(f"save_directory {save_directory!r} is a file; give a folder to write {weight_name} into")
    path = os.path.join(save_directory, weight_name)

    def refuse_existing():
        if not overwrite and os.path.exists(path):
            raise FileExistsError(f"{path} already exists: pass overwrite=True to replace it, or another weight_name")

    refuse_existing()
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        safetensors.torch.save_file(tensors, tmp, metadata=metadata)
        refuse_existing()
    return path

"""Atomic file writes: a reader never sees a half-written file, and a failure leaves nothing behind."""

from __future__ import annotations

import os
import uuid
from contextlib import contextmanager
from typing import Iterator


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

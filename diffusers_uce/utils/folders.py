"""Folders replaced in one step: a save writes the complete new folder aside and then switches it with the old one,
so that at every instant the path holds either the complete old folder or the complete new one."""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import stat
import sys
from contextlib import contextmanager
from typing import Iterator

from .files import _ASIDE, _fsync_folder, _temporary_name, folder_lock, remove_stale_temporaries

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_NO_EXCHANGE = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV}


def _exchange(a: str, b: str) -> bool:
    """Swap the paths `a` and `b` in one step (Linux ``renameat2(RENAME_EXCHANGE)``); `False` where the system or the
    file system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in _NO_EXCHANGE:
        return False
    raise OSError(code, os.strerror(code), b)


def _switch(new: str, path: str) -> None:
    """Put the folder `new` in the place of the folder `path`, then remove the old one."""
    if _exchange(new, path):  # one step: `path` is the old folder, then the new one; the old is now at `new`
        shutil.rmtree(new, ignore_errors=True)
        return
    # Two renames: for a moment `path` is missing; a writer killed then leaves the old folder aside, which the next
    # save (`remove_stale_temporaries`) moves back.
    aside = _temporary_name(path, _ASIDE)
    os.rename(path, aside)
    try:
        os.rename(new, path)
    except BaseException:
        os.rename(aside, path)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def _link_or_copy(source: str, target: str) -> None:
    """`target` as a hard link to the file `source` (a copy where links are not possible)."""
    try:
        os.link(source, target, follow_symlinks=False)
    except OSError:
        shutil.copy2(source, target, follow_symlinks=False)


def _carry_over(old: str, new: str) -> None:
    """Bring into `new` every entry of the folder `old` that `new` does not have (files as hard links)."""
    for name in os.listdir(old):
        source, target = os.path.join(old, name), os.path.join(new, name)
        if os.path.lexists(target):
            continue
        if os.path.isdir(source) and not os.path.islink(source):
            shutil.copytree(source, target, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(source, target)


def _fsync_files(folder: str) -> None:
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            if stat.S_ISREG(os.lstat(path).st_mode):  # regular files only: opening a FIFO would block
                with open(path, "rb") as f:
                    os.fsync(f.fileno())


@contextmanager
def atomic_folder(path: str | os.PathLike, *, update: bool = False) -> Iterator[str]:
    """Yield a temporary folder next to `path`; when the block succeeds, it replaces `path` in one step.

    With `update=False` (a complete new save, as `save_pretrained`) the block writes into an empty folder, and the
    entries of the old folder that it did not write (files of yours) are carried over before the switch. With
    `update=True` (a few files added to a folder, as an edit file and its card) the temporary folder starts as a
    copy of `path` made of hard links, and the block must replace files (write them atomically, never in place).

    On Linux the switch is one `renameat2(RENAME_EXCHANGE)`: at every instant `path` holds the complete old or the
    complete new folder. Elsewhere it is two renames, and a writer killed between them leaves the old folder aside,
    which the next save into the same parent folder moves back. On any failure the temporary folder is removed and
    `path` is left as it was; the leftovers of writers that were killed are removed by the next save. Saves into the
    same parent folder take turns.

    Example:
    ```py
    >>> with atomic_folder("out/pipeline") as folder:
    ...     pipe.save_pretrained(folder)
    ```
    """
    path = os.path.realpath(os.fspath(path))
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{path} is a file, not a folder to save into: give a folder path")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    with folder_lock(parent):  # saves into one parent folder take turns
        remove_stale_temporaries(parent)
        tmp = _temporary_name(path)
        existed = os.path.isdir(path)
        cwd = os.getcwd()
        try:
            if existed and update:
                shutil.copytree(path, tmp, symlinks=True, copy_function=_link_or_copy)
            else:
                os.makedirs(tmp)
            yield tmp
            if existed and not update:
                _carry_over(path, tmp)
            _fsync_files(tmp)
            if existed:
                shutil.copymode(path, tmp)
                _switch(tmp, path)
            else:
                os.rename(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if existed and (cwd == path or cwd.startswith(path + os.sep)):
            os.chdir(cwd)  # the working folder was (inside) the old folder: move to the same place in the new one
    _fsync_folder(parent)

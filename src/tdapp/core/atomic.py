"""Atomic file writes: a reader sees the old file or the whole new one, never a part.

Every write goes to a temporary sibling (``O_EXCL``, the final mode from the
start, so a secret is never briefly readable), is fsynced, and is then published
in one step, after which the folder is fsynced so the name survives a crash:

- :attr:`WriteMode.REPLACE` renames over the target;
- :attr:`WriteMode.CREATE_ONLY` hard-links the temporary file to the target,
  which fails if the target exists, so two processes making the same key at
  once never overwrite each other: the loser gets :class:`FileExistsError` and
  reads the winner's file.

On any failure the temporary file is removed and the target is untouched.
"""

from __future__ import annotations

import contextlib
import enum
import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

TEMP_SUFFIX = ".tdapp-partial"
"""Suffix of the temporary siblings, so that leftovers of a killed process can be told."""


class WriteMode(enum.Enum):
    REPLACE = "replace"
    CREATE_ONLY = "create-only"


def fsync_directory(path: Path) -> None:
    """Make the names in folder ``path`` durable (after a create, rename or unlink)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temporary_sibling(target: Path) -> Path:
    """A fresh, unguessable name next to ``target`` for its partial content."""
    return target.with_name(f".{target.name}.{os.urandom(8).hex()}{TEMP_SUFFIX}")


@contextlib.contextmanager
def atomic_file(target: Path, *, mode: WriteMode = WriteMode.REPLACE,
                permissions: int = 0o644) -> Iterator[BinaryIO]:
    """Yield a handle whose content becomes ``target`` only if the block ends normally."""
    temporary = temporary_sibling(target)
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, permissions)
    try:
        with os.fdopen(fd, "wb", closefd=True) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, permissions)  # the umask may have narrowed it at creation
        match mode:
            case WriteMode.REPLACE:
                os.replace(temporary, target)
            case WriteMode.CREATE_ONLY:
                os.link(temporary, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
    fsync_directory(target.parent)


@contextlib.contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path for a writer that needs a name (a download library);
    its file becomes ``target`` (fsynced, replacing) only if the block ends normally."""
    temporary = temporary_sibling(target)
    try:
        yield temporary
        fd = os.open(temporary, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
    fsync_directory(target.parent)


def write_atomically(target: Path, data: bytes, *, mode: WriteMode = WriteMode.REPLACE,
                     permissions: int = 0o644) -> None:
    """Write ``data`` as ``target`` atomically (see the module docstring)."""
    with atomic_file(target, mode=mode, permissions=permissions) as handle:
        handle.write(data)

"""What every transfer backend (http, s3, file) is, and the helpers they share.

A :class:`Backend` moves bytes for one URL scheme and reports progress through
a :data:`ProgressFactory`. Must never print: progress goes through the
factory, failures are raised as one-line tdapp errors.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Protocol

from tdapp.errors import InputError

CHUNK = 256 * 1024
Advance = Callable[[int], None]
# (description, total bytes or None) -> a context manager yielding a callback taking bytes done
ProgressFactory = Callable[[str, int | None], AbstractContextManager[Advance]]


class Backend(Protocol):
    """Moves bytes for one URL scheme."""

    def upload(self, source: Path, destination: str, progress: ProgressFactory) -> str:
        """Send ``source`` to ``destination``; return the URL it can be downloaded from."""
        ...

    def download(self, url: str, target: Path, progress: ProgressFactory) -> None:
        """Write the object at ``url`` to ``target`` (a temporary file the caller renames)."""
        ...

    def delete(self, url: str) -> None:
        """Remove the object at ``url`` (NotFoundError when there is none)."""
        ...


def default_progress(description: str, total: int | None) -> AbstractContextManager[Advance]:
    from tdapp.core.progress import byte_progress  # imported here: rich loads only when used

    return byte_progress(description, total)


def one_line(text: str, limit: int = 200) -> str:
    return " ".join(text.split())[:limit]


def source_size(source: Path) -> int:
    try:
        info = source.stat()
    except OSError as error:
        raise InputError(f"cannot read {source}: {error.strerror or error}") from None
    if not source.is_file():
        raise InputError(f"{source} is not a file")
    return info.st_size

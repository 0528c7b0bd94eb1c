"""Progress display for long work: a rich bar on a terminal's stderr, nothing on a pipe."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

ProgressCallback = Callable[[int], None]
"""Told the number of bytes done since its last call."""


def _ignore(_: int) -> None:
    return None


@contextlib.contextmanager
def byte_progress(description: str, total: int | None) -> Iterator[ProgressCallback]:
    """Yield a callback that advances a bar by a number of bytes."""
    if not sys.stderr.isatty():
        yield _ignore
        return
    columns = [TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
               TransferSpeedColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=total)

        def advance(count: int) -> None:
            bar.advance(task, count)

        yield advance


def counted(number: int, noun: str) -> str:
    """``1 file``, ``2 files``: a count with its noun in the right number (nouns here
    take an s)."""
    return f"{number} {noun}{'' if number == 1 else 's'}"

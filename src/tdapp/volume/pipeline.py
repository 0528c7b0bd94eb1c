"""Overlapped I/O for streaming one file through the chunk layer: read ahead, write behind.

A large file goes through three stages at once: a reader thread fills buffers from
the source, the calling thread seals or opens chunks (AES-GCM from ``cryptography``
releases the GIL on large buffers, and so do ``readv``/``writev``), and a writer thread
drains the results to the target. Memory stays bounded: the reader owns a fixed pool
of buffers and can never be more than that pool ahead, the writer's queue is bounded,
and every buffer is reused, so a file of any size costs a few batches.

This module only moves bytes: it never looks at keys or plaintext boundaries, and
never decides what may be handed out. The reader hands the caller raw bytes exactly as
read (the caller checks lengths and authenticates); the writer writes only what the
caller already decided to write. Every thread it starts is joined before the
``with`` block that started it is left, on success or on any error, so no thread
outlives the operation and nothing is written after the caller gave up.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Iterable, Iterator, Sequence
from types import TracebackType
from typing import Literal

from tdapp.volume.layout import start_writeback

IOV_MAX = 1024  # Linux's limit on buffers per readv/writev call
_WRITEBACK_BYTES = 8 * 1024 * 1024  # how much written data to hand the disk at a time


class ReadAhead:
    """Reads consecutive byte ranges of ``lengths`` from fd ``source`` in a thread.

    Each length is at most ``buffer_size``; ``lengths`` is consumed by the thread.
    Iterating yields, for each length in turn, a view of the bytes read (shorter
    only where the file ended; nothing is read after a short read). A view stays
    valid until the next one is asked for: then its buffer goes back to the pool.
    At most ``buffers`` ranges are held at once, counting the caller's.
    """

    def __init__(self, source: int, lengths: Iterable[int], buffer_size: int, *,
                 buffers: int) -> None:
        if buffers < 2:
            raise ValueError("read-ahead needs at least two buffers")
        self._source = source
        self._lengths = lengths
        self._free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
        for _ in range(buffers):
            self._free.put(bytearray(buffer_size))
        self._ready: queue.SimpleQueue[tuple[bytearray, int] | BaseException | None] = \
            queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tdapp-read-ahead", daemon=True)

    def __enter__(self) -> ReadAhead:
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> Literal[False]:
        self.close()
        return False

    def close(self) -> None:
        """Stop the reader and wait for it (it finishes at most the read it is in)."""
        self._stop.set()
        self._free.put(bytearray(0))  # wakes a reader waiting for a free buffer
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        try:
            for length in self._lengths:
                buffer = self._free.get()
                if self._stop.is_set():
                    return
                got = read_into(self._source, memoryview(buffer)[:length])
                self._ready.put((buffer, got))
                if got < length:
                    break
            self._ready.put(None)
        except BaseException as error:  # handed to the caller's thread, raised there
            self._ready.put(error)

    def __iter__(self) -> Iterator[memoryview]:
        held: bytearray | None = None
        try:
            while True:
                if held is not None:  # the caller is done with it: it asked for the next
                    self._free.put(held)
                    held = None
                item = self._ready.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                held, got = item
                yield memoryview(held)[:got]
        finally:
            if held is not None:
                self._free.put(held)


class WriteBehind:
    """Writes lists of buffers to fd ``target`` in a thread, in order, ``depth`` lists ahead.

    ``finish()`` waits until everything is written and raises the first write error;
    leaving the ``with`` block on an exception discards what is still queued (nothing
    more is written) and joins the thread. With ``writeback``, written data is handed
    to the disk as it accumulates (``sync_file_range``), so a later sync has little
    left to wait for; durability still comes only from that sync.
    """

    def __init__(self, target: int, *, depth: int, writeback: bool = False) -> None:
        self._target = target
        self._writeback = writeback
        self._queue: queue.Queue[list[bytes] | None] = queue.Queue(max(1, depth))
        self._error: BaseException | None = None
        self._abort = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tdapp-write-behind",
                                        daemon=True)

    def __enter__(self) -> WriteBehind:
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> Literal[False]:
        if kind is not None:
            self._abort.set()
        self._stop()
        return False

    def write(self, pieces: list[bytes]) -> None:
        """Queue ``pieces`` (blocks while ``depth`` lists wait); raises an earlier error."""
        if self._error is not None:
            raise self._error
        self._queue.put(pieces)

    def finish(self) -> None:
        self._stop()
        if self._error is not None:
            raise self._error

    def _stop(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)  # the thread always drains, so this never blocks for long
            self._thread.join()

    def _run(self) -> None:
        offset = flushed = 0
        while (pieces := self._queue.get()) is not None:
            if self._error is not None or self._abort.is_set():
                continue  # keep draining so that the caller never blocks
            try:
                offset += write_pieces(self._target, pieces)
                if self._writeback and offset - flushed >= _WRITEBACK_BYTES:
                    start_writeback(self._target, flushed, offset - flushed)
                    flushed = offset
            except BaseException as error:  # raised in the caller's thread
                self._error = error


def read_into(source: int, view: memoryview) -> int:
    """Fill ``view`` from ``source`` until it is full or the file ends; return bytes read."""
    filled = 0
    while filled < len(view):
        got = os.readv(source, [view[filled:]])
        if not got:
            break
        filled += got
    return filled


def write_pieces(target: int, pieces: Sequence[bytes | memoryview]) -> int:
    """Write every piece, in order, with as few ``writev`` calls as it takes; bytes written."""
    views = [memoryview(piece) for piece in pieces if len(piece)]
    total = sum(len(view) for view in views)
    first = 0
    while first < len(views):
        done = os.writev(target, views[first:first + IOV_MAX])
        while first < len(views) and done >= len(views[first]):  # drop what was written
            done -= len(views[first])
            first += 1
        if done:
            views[first] = views[first][done:]
    return total

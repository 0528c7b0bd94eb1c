"""Whole authenticated chunks into the kernel's page cache of a read-only shield mount.

The shield authenticates a whole chunk (64 KiB by default) to answer any read inside it;
a small read (a random 4 KiB, readahead turned off) would otherwise leave the rest of
that plaintext in the shield alone, and the next small read of the same chunk would cost
another FUSE round trip. :class:`ChunkPusher` stores the rest of such a chunk into the
mount's page cache with libfuse's ``fuse_lowlevel_notify_store``, from its own thread.

What it owns, and must never do:

- It pushes only plaintext that authenticated (the caller hands it chunks from the live
  volume's cache of verified chunks), and only on a read-only mount: there the files do
  not change while mounted, so a push that lands late can never put older content over
  newer. It must never push on a mount that can be written.
- It runs in its own thread because a store waits for any page a pending read holds
  locked, and only the FUSE thread can answer that read; the FUSE thread never waits
  for it. A push that finds the queue full is dropped (it only saves a later round trip).
- It stops before libfuse frees the session (:meth:`close`, from the file system's
  ``destroy``): after that no push may run.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
QUEUED_PUSHES = 64  # chunks waiting to be pushed; more are dropped


class _FuseBuf(ctypes.Structure):
    _fields_ = [("size", ctypes.c_size_t), ("flags", ctypes.c_int), ("mem", ctypes.c_void_p),
                ("fd", ctypes.c_int), ("pos", ctypes.c_int64),
                ("_reserved", ctypes.c_size_t * 2)]  # zero: room for later libfuse fields


class _FuseBufvec(ctypes.Structure):
    _fields_ = [("count", ctypes.c_size_t), ("idx", ctypes.c_size_t), ("off", ctypes.c_size_t),
                ("buf", _FuseBuf * 1)]


@dataclass(frozen=True)
class _Push:
    path: str  # relative to the mount
    chunk_start: int
    plaintext: bytes
    read_start: int  # the read that authenticated it: those pages are the read's own
    read_end: int


def _segments(push: _Push) -> list[tuple[int, int]]:
    """The whole pages of the chunk outside the read: (offset in the file, length)."""
    chunk_end = push.chunk_start + len(push.plaintext)
    before_end = push.read_start - push.read_start % PAGE
    after_start = -(-push.read_end // PAGE) * PAGE
    found = []
    if before_end > push.chunk_start:
        found.append((push.chunk_start, before_end - push.chunk_start))
    if after_start < chunk_end:
        # the chunk's end is a page boundary or the file's end: the kernel then takes it whole
        found.append((after_start, chunk_end - after_start))
    return found


class ChunkPusher:
    """Pushes authenticated chunks of a read-only mount into its page cache, in one thread."""

    def __init__(self, library: Any, mountpoint: Path) -> None:
        self._mountpoint = mountpoint
        self._queue: queue.Queue[_Push | None] = queue.Queue(QUEUED_PUSHES)
        self._lock = threading.Lock()  # held by each store; close() takes it to end them
        self._closed = False
        self._session: int | None = None
        self._nodes: dict[str, int] = {}
        self._store = library.fuse_lowlevel_notify_store
        self._store.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int64,
                                ctypes.POINTER(_FuseBufvec), ctypes.c_int]
        self._store.restype = ctypes.c_int
        self._get_session = library.fuse_get_session
        self._get_session.argtypes = [ctypes.c_void_p]
        self._get_session.restype = ctypes.c_void_p
        self._context = library.fuse_get_context
        self._thread = threading.Thread(target=self._run, daemon=True, name="tdapp-shield-push")

    def start(self) -> None:
        """Start; called from a FUSE callback, where libfuse's context names the session."""
        context = self._context()
        fuse = ctypes.cast(context, ctypes.POINTER(ctypes.c_void_p)).contents.value
        self._session = self._get_session(fuse) if fuse else None
        if self._session:
            self._thread.start()

    def push(self, path: str, chunk_start: int, plaintext: bytes, read_start: int,
             read_end: int) -> None:
        """Queue the pages of an authenticated chunk that the read ``read_start..read_end``
        did not cover; dropped if the queue is full or the pusher is not running."""
        if self._session is None or self._closed:
            return
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(_Push(path, chunk_start, plaintext, read_start, read_end))

    def close(self) -> None:
        """Stop: no store runs once this returns (libfuse frees the session next)."""
        # At unmount the kernel has ended every read, so a store in progress returns; the
        # timeout only keeps a wedged kernel from holding the process.
        if self._lock.acquire(timeout=5):
            self._closed = True
            self._lock.release()
        self._closed = True
        if self._thread.is_alive():
            with contextlib.suppress(queue.Full):
                self._queue.put_nowait(None)
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            node = self._node(item.path)
            if node is None:
                continue
            for offset, length in _segments(item):
                if self._store_range(node, item, offset, length) == -errno.ENOENT:
                    self._nodes.pop(item.path, None)  # the kernel forgot the inode: look again
                    break

    def _node(self, path: str) -> int | None:
        """The FUSE node id of ``path``: libfuse reports it as the inode number (no
        ``use_ino``). A stat from this thread is answered by the FUSE thread."""
        if path not in self._nodes:
            try:
                self._nodes[path] = os.stat(self._mountpoint / path).st_ino
            except OSError:
                return None
        return self._nodes[path]

    def _store_range(self, node: int, item: _Push, offset: int, length: int) -> int:
        vector = _FuseBufvec(count=1, idx=0, off=0)
        vector.buf[0].size = length
        vector.buf[0].fd = -1
        base = ctypes.cast(ctypes.c_char_p(item.plaintext), ctypes.c_void_p).value or 0
        vector.buf[0].mem = base + offset - item.chunk_start
        with self._lock:
            if self._closed:
                return 0
            result: int = self._store(self._session, node, offset, ctypes.byref(vector), 0)
        return result

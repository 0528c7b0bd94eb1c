"""A new version of one file being written: a fresh key and object, sealed chunk by chunk.

Owns the rule that keeps AES-GCM safe while a file changes: under one key each
chunk index is sealed at most once, and a chunk is sealed as "not last" only
while the file extends beyond it. A chunk that must change after it was sealed
moves the whole version to a fresh key (and object) first. Unsealed chunks stay
in memory; chunks of the version it replaces are read, verified, through the
caller's ``base_chunk``. Must never seal a chunk index twice under one key.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from collections.abc import Callable

from tdapp.volume.chunks import FileSealer, chunk_count, new_object_id_and_key, stored_size
from tdapp.volume.fspf import PERMISSION_BITS, TAG_SIZE, FileEntry
from tdapp.volume.layout import VolumeFolder
from tdapp.volume.regions import RegionKind


class NewVersion:
    """A new version of one file, being written: fresh key, own object, sealed chunk by chunk."""

    def __init__(self, folder: VolumeFolder, path: str, region: RegionKind, chunk_size: int,
                 mode: int, base: FileEntry | None, base_chunk: Callable[[int], bytes]) -> None:
        self._folder, self.path, self.region, self._cs = folder, path, region, chunk_size
        self.mode, self.mtime_ns = mode & PERMISSION_BITS, time.time_ns()
        self._base_chunk = base_chunk
        self.size = base.size if base is not None else 0
        self._base_limit = self.size  # base bytes at or beyond this read as zeros
        self._dirty: dict[int, bytearray] = {}
        self._sealed: set[int] = set()
        self.superseded: list[str] = []  # objects of earlier keys of this version
        self._new_key()

    def _new_key(self) -> None:
        self.object_id, self._key = new_object_id_and_key()
        entry = FileEntry(self.region, 0, self.mode, 0, self.object_id, self._key)
        self._sealer = FileSealer(self.path, entry, self._cs)
        self._fd = self._folder.create_object(entry.object_name, readable=True)

    @property
    def object_name(self) -> str:
        return self.object_id.hex()

    def _length(self, index: int) -> int:
        return max(0, min(self._cs, self.size - index * self._cs))

    def _offset(self, index: int) -> int:
        return index * (self._cs + TAG_SIZE)

    def chunk(self, index: int) -> bytes:
        """The current plaintext of chunk ``index`` (zeros where nothing was written)."""
        length = self._length(index)
        if index in self._dirty:
            data = bytes(self._dirty[index][:length])
        elif index in self._sealed:
            stored = os.pread(self._fd, self._cs + TAG_SIZE, self._offset(index))
            data = self._sealer.open(index, stored, last=False)
        elif index * self._cs < self._base_limit:
            data = self._base_chunk(index)[:self._base_limit - index * self._cs][:length]
        else:
            data = b""
        return data + bytes(length - len(data))

    def write(self, offset: int, data: bytes | memoryview) -> None:
        position, view = offset, memoryview(data)
        self.size = max(self.size, offset + len(data))
        run_start, run = 0, list[bytes]()  # whole chunks sealed from ``data``, to write at once
        while view:
            index, within = divmod(position, self._cs)
            count = min(self._cs - within, len(view))
            if within == 0 and count == self._cs and index not in self._sealed \
                    and (index + 1) * self._cs < self.size:
                # A whole chunk, not yet sealed under this key, and the file goes on past
                # it: nothing else can be in it, so it is sealed from the request itself.
                self._dirty.pop(index, None)
                if not run:
                    run_start = index
                run.append(self._sealer.seal(index, view[:count], last=False))
                self._sealed.add(index)
            else:
                self._write_run(run_start, run)
                buffer = self._editable(index)
                if len(buffer) < within:
                    buffer.extend(bytes(within - len(buffer)))
                buffer[within:within + count] = view[:count]
            position, view = position + count, view[count:]
        self._write_run(run_start, run)
        self.mtime_ns = time.time_ns()
        self._seal_full_chunks()

    def _write_run(self, first: int, run: list[bytes]) -> None:
        """Write sealed whole chunks ``first``, ``first + 1``, ... with one system call."""
        if run:
            written = os.pwritev(self._fd, run, self._offset(first))
            if written != len(run) * (self._cs + TAG_SIZE):
                raise OSError(errno.EIO, "short write of a sealed chunk", self.path)
            run.clear()

    def truncate(self, length: int) -> None:
        if length < self.size:
            last = chunk_count(length, self._cs) - 1
            beyond = {index for index in self._sealed if index > last}
            if last in self._sealed or beyond:
                # Chunks sealed past the new end must not be sealed again under this key
                # when the file grows back: drop them, then move the rest to a fresh key.
                self._sealed -= beyond
                self._rekey(keep=last)
            self._sealed = {index for index in self._sealed if index < last}
            self._dirty = {index: buffer for index, buffer in self._dirty.items()
                           if index <= last}
            if last in self._dirty:
                del self._dirty[last][length - last * self._cs:]
            self._base_limit = min(self._base_limit, length)
        self.size = length
        self.mtime_ns = time.time_ns()

    def _editable(self, index: int) -> bytearray:
        if index not in self._dirty:
            if index in self._sealed:
                self._rekey(keep=index)
            else:
                self._dirty[index] = bytearray(self.chunk(index))
        return self._dirty[index]

    def _seal_full_chunks(self) -> None:
        for index in [i for i, buffer in self._dirty.items()
                      if len(buffer) >= self._cs and (i + 1) * self._cs < self.size]:
            # Not the last chunk, and the file goes on past it: sealed once, as "not last".
            sealed = self._sealer.seal(index, bytes(self._dirty.pop(index)[:self._cs]),
                                       last=False)
            os.pwrite(self._fd, sealed, self._offset(index))
            self._sealed.add(index)

    def _rekey(self, keep: int) -> None:
        """Move every sealed chunk under a fresh key, keeping chunk ``keep`` editable."""
        old_fd, old_sealer, old_name = self._fd, self._sealer, self.object_name
        sealed, self._sealed = sorted(self._sealed), set()
        self._new_key()
        try:
            for index in sealed:
                stored = os.pread(old_fd, self._cs + TAG_SIZE, self._offset(index))
                plaintext = old_sealer.open(index, stored, last=False)
                if index == keep:
                    self._dirty[index] = bytearray(plaintext)
                else:
                    os.pwrite(self._fd, self._sealer.seal(index, plaintext, last=False),
                              self._offset(index))
                    self._sealed.add(index)
        finally:
            os.close(old_fd)
            self.superseded.append(old_name)

    def seal(self) -> FileEntry:
        """Seal what is left and close: the version's entry for the FSPF."""
        chunks = chunk_count(self.size, self._cs)
        try:
            for index in range(chunks):
                if index not in self._sealed:
                    sealed = self._sealer.seal(index, self.chunk(index),
                                               last=index == chunks - 1)
                    os.pwrite(self._fd, sealed, self._offset(index))
            os.ftruncate(self._fd, stored_size(self.size, self._cs))
        finally:
            os.close(self._fd)
        return FileEntry(self.region, self.size, self.mode & PERMISSION_BITS, self.mtime_ns,
                         self.object_id, self._key)

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)
        self.superseded.append(self.object_name)

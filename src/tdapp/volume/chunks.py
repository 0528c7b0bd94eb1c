"""Chunked AEAD for one file's content (the hazardous layer under the volume API).

Each file version has its own random key and object id, so the per-chunk nonce
(the chunk index) never repeats under a key. Every chunk's associated data
binds the region, the object id, the chunk index and whether it is the last
chunk, so chunks cannot be reordered, swapped between files, dropped or
appended. This module must never hand out plaintext of a chunk that failed
authentication; it holds a few batches of a file in memory at most (see
``pipeline_depths``), whatever the file's size.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterator

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from tdapp.errors import InputError, IntegrityError
from tdapp.volume.fspf import TAG_SIZE, FileEntry
from tdapp.volume.pipeline import ReadAhead, WriteBehind, read_into, write_pieces
from tdapp.volume.regions import RegionKind

_AAD_PREFIX = b"tdapp/v1 chunk\x00"
_AAD_TAIL = struct.Struct(">16sQB")
_REGION_BYTE = {RegionKind.ENCRYPTED: b"E", RegionKind.AUTHENTICATED: b"A"}


def chunk_count(size: int, chunk_size: int) -> int:
    """Number of chunks for ``size`` bytes; an empty file still has one (empty) chunk."""
    return max(1, -(-size // chunk_size))


def stored_size(size: int, chunk_size: int) -> int:
    return size + TAG_SIZE * chunk_count(size, chunk_size)


class FileSealer:
    """Seals and opens the chunks of one file version."""

    __slots__ = (
        "_aad_head",
        "_aead",
        "_authenticated_only",
        "_object_id",
        "chunk_size",
        "chunks",
        "path",
    )

    def __init__(self, path: str, entry: FileEntry, chunk_size: int) -> None:
        self.path = path
        self.chunk_size = chunk_size
        self.chunks = chunk_count(entry.size, chunk_size)
        self._aead = AESGCM(entry.file_key)
        self._object_id = entry.object_id
        self._aad_head = _AAD_PREFIX + _REGION_BYTE[entry.region]
        self._authenticated_only = entry.region is RegionKind.AUTHENTICATED

    def _aad(self, index: int, last: bool | None) -> bytes:
        if last is None:
            last = index == self.chunks - 1
        return self._aad_head + _AAD_TAIL.pack(self._object_id, index, 1 if last else 0)

    @staticmethod
    def _nonce(index: int) -> bytes:
        return index.to_bytes(12, "big")

    def seal(self, index: int, payload: bytes | memoryview, *, last: bool | None = None) -> bytes:
        """Seal chunk ``index``; ``last`` overrides "is it the final chunk" for a file still
        being written (each index is sealed once per key: the caller's promise)."""
        aad = self._aad(index, last)
        if self._authenticated_only:
            mac = self._aead.encrypt(self._nonce(index), b"", aad + payload)
            return bytes(payload) + mac
        return self._aead.encrypt(self._nonce(index), payload, aad)

    def open(self, index: int, stored: bytes | memoryview, *, last: bool | None = None) -> bytes:
        aad = self._aad(index, last)
        try:
            if self._authenticated_only:
                payload = bytes(stored[:-TAG_SIZE])
                self._aead.decrypt(self._nonce(index), stored[-TAG_SIZE:], aad + payload)
                return payload
            return self._aead.decrypt(self._nonce(index), stored, aad)
        except InvalidTag:
            raise IntegrityError(
                f"chunk {index} of {self.path} failed authentication"
            ) from None


def seal_stream(source: int, target: int, sealer: FileSealer, size: int,
                progress: Callable[[int], None]) -> None:
    """Read exactly ``size`` bytes from fd ``source`` and write them sealed to fd ``target``.

    A file of more than two batches is read ahead, sealed and written behind at once
    (see :mod:`tdapp.volume.pipeline`); the object on disk is the same either way.
    """
    batches = _Batches(sealer, size, 0)
    # One spare byte lets the read of the last batch also detect a file that grew.
    lengths = (batches.length(batch) + (batch == batches.count - 1)
               for batch in range(batches.count))
    if not pipelined(size, sealer.chunk_size):
        buffer = memoryview(bytearray(min(batches.buffer_size, size) + 1))
        for batch, length in enumerate(lengths):
            got = read_into(source, buffer[:length])
            write_pieces(target, _seal_batch(sealer, batches, batch, buffer[:got]))
            progress(batches.length(batch))
        return
    buffers, depth = pipeline_depths(sealer.chunk_size)
    with ReadAhead(source, lengths, batches.buffer_size + 1, buffers=buffers) as reader, \
            WriteBehind(target, depth=depth, writeback=True) as writer:
        views = iter(reader)
        for batch in range(batches.count):
            writer.write(_seal_batch(sealer, batches, batch, next(views, _NOTHING)))
            progress(batches.length(batch))
        writer.finish()


def _seal_batch(sealer: FileSealer, batches: _Batches, batch: int,
                view: memoryview) -> list[bytes]:
    want = batches.length(batch)
    if len(view) < want:
        raise InputError(f"{sealer.path} shrank while it was being read; try again")
    if len(view) > want:
        raise InputError(f"{sealer.path} grew while it was being read; try again")
    return [sealer.seal(index, view[start:stop]) for index, start, stop in batches.chunks(batch)]


def open_stream(source: int, sealer: FileSealer, size: int) -> Iterator[bytes]:
    """Yield the authenticated plaintext chunks of the stored object open as fd ``source``,
    each as soon as it verified (a chunk that fails ends the stream with IntegrityError).

    The object's length is checked first, so truncation and extension are named
    as such before any chunk is read; the stored bytes are read a batch at a time.
    """
    batches = _Batches(sealer, size, TAG_SIZE)
    for batch, view in _stored_batches(source, sealer, size, batches):
        for index, start, stop in batches.chunks(batch):
            yield sealer.open(index, view[start:stop])


_NOTHING = memoryview(b"")


def _stored_batches(source: int, sealer: FileSealer, size: int,
                    batches: _Batches) -> Iterator[tuple[int, memoryview]]:
    """Each batch's sealed bytes, checked for length only; valid until the next one."""
    actual = os.fstat(source).st_size
    expected = stored_size(size, sealer.chunk_size)
    if actual != expected:
        change = "truncated" if actual < expected else "extended"
        raise IntegrityError(
            f"{sealer.path} was {change} (stored {actual} bytes, expected {expected})"
        )
    truncated = f"{sealer.path} was truncated while it was being read"
    # Read in this thread: a reading thread measured slower here (twice the CPU per GiB
    # on two cores), and the decryption itself does not release the GIL.
    buffer = memoryview(bytearray(min(batches.buffer_size, expected)))
    for batch in range(batches.count):
        want = batches.length(batch)
        if read_into(source, buffer[:want]) < want:
            raise IntegrityError(truncated)
        yield batch, buffer[:want]


BATCH_BYTES = 1024 * 1024
"""Plaintext read, sealed or opened, and written per batch (at least one chunk)."""
_MAX_BATCH_CHUNKS = 256  # so that tiny chunk sizes do not make huge batches of tiny writes
_BIG_BATCH_BYTES = 8 * 1024 * 1024


def pipeline_depths(chunk_size: int) -> tuple[int, int]:
    """(read-ahead buffers, write-behind queue depth) for a volume's chunk size.

    In flight at once while sealing: the read buffers, the batch being sealed, the
    queued batches and the one being written -- 8 batches of about 1 MiB at the
    default chunk size, 5 chunks where one chunk is 8 MiB or more.
    """
    if batch_chunks(chunk_size) * chunk_size >= _BIG_BATCH_BYTES:
        return 2, 1
    return 4, 2


def pipelined(size: int, chunk_size: int) -> bool:
    """Whether a file of ``size`` bytes is worth the reader and writer threads: more
    than two batches (for fewer, starting the threads costs more than it saves)."""
    return size > 2 * batch_chunks(chunk_size) * chunk_size


def batch_chunks(chunk_size: int) -> int:
    return max(1, min(_MAX_BATCH_CHUNKS, BATCH_BYTES // chunk_size))


class _Batches:
    """A file's chunks grouped in batches of consecutive chunks, as stored byte ranges
    (``overhead`` bytes per chunk: 0 for plaintext, the tag for sealed chunks)."""

    def __init__(self, sealer: FileSealer, size: int, overhead: int) -> None:
        self._size = size
        self._chunk_size = sealer.chunk_size
        self._overhead = overhead
        self._chunks = sealer.chunks
        self._per = batch_chunks(sealer.chunk_size)
        self.count = -(-self._chunks // self._per)
        self.buffer_size = self._per * (sealer.chunk_size + overhead)

    def _range(self, batch: int) -> tuple[int, int]:
        first = batch * self._per
        return first, min(self._chunks, first + self._per)

    def length(self, batch: int) -> int:
        """Stored bytes of ``batch``."""
        first, end = self._range(batch)
        plaintext = min(self._size, end * self._chunk_size) - first * self._chunk_size
        return plaintext + (end - first) * self._overhead

    def chunks(self, batch: int) -> Iterator[tuple[int, int, int]]:
        """(chunk index, start, stop) of each chunk of ``batch`` within the batch's bytes."""
        first, end = self._range(batch)
        offset = 0
        for index in range(first, end):
            plaintext = min(self._chunk_size, self._size - index * self._chunk_size)
            yield index, offset, offset + plaintext + self._overhead
            offset += plaintext + self._overhead


def write_all(target: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(target, view):]


def new_object_id_and_key() -> tuple[bytes, bytes]:
    """A fresh random object id (16 bytes) and file key (32 bytes), from one getrandom."""
    material = os.urandom(48)
    return material[:16], material[16:]

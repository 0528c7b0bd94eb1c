"""Chunked AEAD for one file's content (the hazardous layer under the volume API).

Each file version has its own random key and object id, so the per-chunk nonce
(the chunk index) never repeats under a key. Every chunk's associated data
binds the region, the object id, the chunk index and whether it is the last
chunk, so chunks cannot be reordered, swapped between files, dropped or
appended. This module must never hand out plaintext of a chunk that failed
authentication, and never hold more than one chunk of a file in memory.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterator

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from tdapp.errors import InputError, IntegrityError
from tdapp.volume.fspf import TAG_SIZE, FileEntry
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
    """Read exactly ``size`` bytes from fd ``source`` and write them sealed to fd ``target``."""
    # One spare byte lets the read of the last chunk also detect a file that grew.
    buffer = bytearray(sealer.chunk_size + 1)
    view = memoryview(buffer)
    remaining = size
    last = sealer.chunks - 1
    for index in range(sealer.chunks):
        want = min(sealer.chunk_size, remaining)
        got = _read_into(source, view[: want + 1] if index == last else view[:want])
        if got < want:
            raise InputError(f"{sealer.path} shrank while it was being read; try again")
        if got > want:
            raise InputError(f"{sealer.path} grew while it was being read; try again")
        write_all(target, sealer.seal(index, view[:want]))
        remaining -= want
        progress(want)


def open_stream(source: int, sealer: FileSealer, size: int) -> Iterator[bytes]:
    """Yield the authenticated plaintext chunks of the stored object open as fd ``source``.

    The object's length is checked first, so truncation and extension are named
    as such before any chunk is read.
    """
    actual = os.fstat(source).st_size
    expected = stored_size(size, sealer.chunk_size)
    if actual != expected:
        change = "truncated" if actual < expected else "extended"
        raise IntegrityError(
            f"{sealer.path} was {change} (stored {actual} bytes, expected {expected})"
        )
    buffer = bytearray(sealer.chunk_size + TAG_SIZE)
    view = memoryview(buffer)
    remaining = size
    for index in range(sealer.chunks):
        want = min(sealer.chunk_size, remaining) + TAG_SIZE
        if _read_into(source, view[:want]) < want:
            raise IntegrityError(f"{sealer.path} was truncated while it was being read")
        yield sealer.open(index, view[:want])
        remaining -= want - TAG_SIZE


def _read_into(source: int, view: memoryview) -> int:
    """Fill ``view`` from ``source`` until it is full or the file ends; return bytes read."""
    filled = 0
    while filled < len(view):
        got = os.readv(source, [view[filled:]])
        if not got:
            break
        filled += got
    return filled


def write_all(target: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(target, view):]


def new_object_id_and_key() -> tuple[bytes, bytes]:
    """A fresh random object id (16 bytes) and file key (32 bytes), from one getrandom."""
    material = os.urandom(48)
    return material[:16], material[16:]

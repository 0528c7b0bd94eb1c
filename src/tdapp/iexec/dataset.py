"""iExec's dataset format: what ``iexec dataset encrypt`` writes and the pre-compute enclave opens.

Owns the byte layout (``IV(16) ‖ AES-256-CBC(PKCS#7(plaintext))``, key = base64
text of 32 random bytes), the dataset checksum (``0x`` + sha256 hex of the
*encrypted* file, what a dataset's on-chain ``checksum`` field holds) and the
key type. The layout is iExec's, byte for byte, so a file made here opens in
iexec-common / tee-worker-pre-compute and one made there opens here.

CBC carries no MAC: a flipped byte may decrypt to different plaintext without any
error. The checksum is what authenticates a dataset file, so a caller that has
the registered checksum must check it (:func:`check_checksum`) before trusting
the plaintext. This module must never put key bytes in a message or a repr, and
never reuse an IV: every encryption draws a fresh one from ``os.urandom``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
from pathlib import Path
from typing import BinaryIO

from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from tdapp.core.atomic import WriteMode, atomic_file
from tdapp.errors import InputError, IntegrityError

KEY_SIZE = 32
IV_SIZE = 16
_BLOCK = 16
_CHUNK = 1 << 20
_WRONG = "wrong key or not an iExec dataset"
_CHECKSUM = re.compile(r"0[xX][0-9a-fA-F]{64}")


class DatasetKey:
    """A dataset's AES-256 key. Its repr never shows the key; ``.b64()`` is its iExec form."""

    __slots__ = ("_key",)

    def __init__(self, raw: bytes) -> None:
        if not isinstance(raw, bytes) or len(raw) != KEY_SIZE:
            raise InputError(f"a dataset key is {KEY_SIZE} bytes")
        self._key = raw

    @classmethod
    def generate(cls) -> DatasetKey:
        return cls(os.urandom(KEY_SIZE))

    @classmethod
    def from_b64(cls, text: str | bytes) -> DatasetKey:
        """The key from its base64 text (surrounding whitespace, as in a key file, is ignored)."""
        try:
            raw = base64.b64decode(text.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise InputError("the dataset key is not base64 text") from None
        if len(raw) != KEY_SIZE:
            raise InputError(f"the dataset key is not base64 of {KEY_SIZE} bytes")
        return cls(raw)

    def b64(self) -> str:
        """The key as iExec stores it (the dataset secret pushed to the SMS)."""
        return base64.b64encode(self._key).decode("ascii")

    def to_bytes(self) -> bytes:
        return self._key

    def __repr__(self) -> str:
        return "DatasetKey(<hidden>)"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, DatasetKey):
            return NotImplemented
        return hmac.compare_digest(self._key, other._key)

    def __hash__(self) -> int:
        # Hash of a digest, not of the key, so that the hash reveals nothing useful.
        return hash(hashlib.sha256(b"tdapp dataset key\0" + self._key).digest())

    def __reduce__(self) -> str:
        # No pickling: a pickle is an easy way for a key to end up in a log or a cache.
        raise TypeError("a DatasetKey cannot be pickled")


def generate_dataset_key() -> DatasetKey:
    """A fresh random dataset key."""
    return DatasetKey.generate()


def _as_key(key: DatasetKey | str) -> DatasetKey:
    return key if isinstance(key, DatasetKey) else DatasetKey.from_b64(key)


def encrypt_dataset(data: bytes, key: DatasetKey | str) -> bytes:
    """``IV ‖ AES-256-CBC(PKCS#7(data))`` with a fresh random IV."""
    iv = os.urandom(IV_SIZE)
    encryptor = Cipher(algorithms.AES(_as_key(key).to_bytes()), modes.CBC(iv)).encryptor()
    padder = padding.PKCS7(_BLOCK * 8).padder()
    padded = padder.update(data) + padder.finalize()
    return iv + encryptor.update(padded) + encryptor.finalize()


def decrypt_dataset(blob: bytes, key: DatasetKey | str) -> bytes:
    """The plaintext of an iExec dataset file; InputError if the key or the file is wrong.

    Only the padding is checked (CBC has no MAC), so a wrong key is detected with
    probability about 255/256 and a modified file not at all: check the checksum.
    """
    if len(blob) < IV_SIZE + _BLOCK or (len(blob) - IV_SIZE) % _BLOCK:
        raise InputError(_WRONG)
    decryptor = Cipher(algorithms.AES(_as_key(key).to_bytes()),
                       modes.CBC(blob[:IV_SIZE])).decryptor()
    padded = decryptor.update(blob[IV_SIZE:]) + decryptor.finalize()
    unpadder = padding.PKCS7(_BLOCK * 8).unpadder()
    try:
        return unpadder.update(padded) + unpadder.finalize()
    except ValueError:
        raise InputError(_WRONG) from None


def dataset_checksum(blob: bytes) -> str:
    """``0x`` + lower-case sha256 hex of the encrypted file (the dataset's on-chain checksum)."""
    return "0x" + hashlib.sha256(blob).hexdigest()


def parse_checksum(expected: str) -> str:
    """``expected`` as ``0x`` + 64 lower-case hex digits; InputError if it is not a sha256."""
    text = expected.strip()
    if not _CHECKSUM.fullmatch(text):
        raise InputError("the checksum must be 0x followed by 64 hex digits (a sha256)")
    return "0x" + text[2:].lower()


def _compare(actual: str, expected: str) -> None:
    wanted = parse_checksum(expected)
    if not hmac.compare_digest(actual.encode("ascii"), wanted.encode("ascii")):
        raise IntegrityError(f"checksum mismatch: the file's is {actual}, expected {wanted} "
                             "(not the registered dataset, or modified)")


def check_checksum(blob: bytes, expected: str) -> None:
    """IntegrityError unless ``blob``'s checksum is ``expected`` (``0x``/``0X``, any case)."""
    _compare(dataset_checksum(blob), expected)


# -- file to file, in bounded memory ---------------------------------------------------


def encrypt_dataset_file(source: Path, target: Path, key: DatasetKey | str, *,
                         mode: WriteMode = WriteMode.CREATE_ONLY) -> str:
    """Encrypt file ``source`` into ``target`` (atomically); return the checksum of ``target``.

    Reads and writes in 1 MiB pieces, so a dataset of any size fits in memory.
    ``target`` is created only (FileExistsError if it exists) unless ``mode`` says REPLACE.
    """
    iv = os.urandom(IV_SIZE)
    encryptor = Cipher(algorithms.AES(_as_key(key).to_bytes()), modes.CBC(iv)).encryptor()
    padder = padding.PKCS7(_BLOCK * 8).padder()
    checksum = hashlib.sha256()
    with _open_input(source) as reader, atomic_file(target, mode=mode) as writer:
        def emit(piece: bytes) -> None:
            checksum.update(piece)
            writer.write(piece)

        emit(iv)
        while piece := reader.read(_CHUNK):
            emit(encryptor.update(padder.update(piece)))
        emit(encryptor.update(padder.finalize()) + encryptor.finalize())
    return "0x" + checksum.hexdigest()


def decrypt_dataset_file(source: Path, target: Path, key: DatasetKey | str, *,
                         checksum: str | None = None,
                         mode: WriteMode = WriteMode.CREATE_ONLY) -> None:
    """Decrypt dataset file ``source`` into ``target`` (mode 0600, atomically).

    With ``checksum``, the encrypted file must have it (IntegrityError otherwise).
    Nothing is published at ``target`` unless the padding and the checksum both pass.
    """
    if checksum is not None:
        parse_checksum(checksum)  # a malformed --checksum is refused before any work
    size = _size(source)
    if size < IV_SIZE + _BLOCK or (size - IV_SIZE) % _BLOCK:
        raise InputError(f"{source}: {_WRONG}")
    digest = hashlib.sha256()
    with _open_input(source) as reader, atomic_file(target, mode=mode,
                                                    permissions=0o600) as writer:
        iv = reader.read(IV_SIZE)
        digest.update(iv)
        decryptor = Cipher(algorithms.AES(_as_key(key).to_bytes()), modes.CBC(iv)).decryptor()
        unpadder = padding.PKCS7(_BLOCK * 8).unpadder()
        try:
            while piece := reader.read(_CHUNK):
                digest.update(piece)
                writer.write(unpadder.update(decryptor.update(piece)))
            writer.write(unpadder.update(decryptor.finalize()) + unpadder.finalize())
        except ValueError:
            raise InputError(f"{source}: {_WRONG}") from None
        if checksum is not None:
            _compare("0x" + digest.hexdigest(), checksum)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        raise InputError(f"{path} does not exist") from None


def _open_input(path: Path) -> BinaryIO:
    try:
        return path.open("rb")
    except FileNotFoundError:
        raise InputError(f"{path} does not exist") from None
    except IsADirectoryError:
        raise InputError(f"{path} is a folder, not a file") from None

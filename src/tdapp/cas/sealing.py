"""The CAS master key: seals every secret the database holds.

The master key lives in a file outside the database (``master.key``, mode
0600), so a copy of the database alone reveals no session, volume key or
secret. Each record is sealed under its own key derived from the master key
and a fresh random salt, and bound to what it is (its associated data), so a
sealed value cannot be moved to another row. Must never log or return the key.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from tdapp.core.atomic import WriteMode, write_atomically
from tdapp.errors import InputError, IntegrityError

_FORMAT = b"\x01"
_SALT_SIZE = 32
_ZERO_NONCE = bytes(12)
_INFO = b"tdapp/v1 cas record"


class MasterKey:
    __slots__ = ("_key",)

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise InputError("the CAS master key must be 32 bytes")
        self._key = key

    def __repr__(self) -> str:
        return "MasterKey(<hidden>)"

    @classmethod
    def load_or_create(cls, path: Path) -> MasterKey:
        """Read the key file, or make one (mode 0600) the first time the CAS starts.

        Made create-only: when two replicas start at once on a new state folder,
        one key wins and both use it (a replaced key would make the other's
        sealed rows unreadable).
        """
        if not path.exists():
            with contextlib.suppress(FileExistsError):
                write_atomically(path, os.urandom(32).hex().encode() + b"\n",
                                 mode=WriteMode.CREATE_ONLY, permissions=0o600)
        if path.stat().st_mode & 0o077:
            raise InputError(f"{path} is readable by other users; run: chmod 600 {path}")
        try:
            return cls(bytes.fromhex(path.read_text().strip()))
        except ValueError:
            raise InputError(f"{path} does not hold a 64-hex master key") from None

    def subkey(self, purpose: bytes) -> bytes:
        """A 32-byte key for one purpose (e.g. nonce MACs), independent of every other."""
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                    info=b"tdapp/v1 cas " + purpose).derive(self._key)

    def _aead(self, salt: bytes) -> AESGCM:
        derived = HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=_INFO).derive(
            self._key)
        return AESGCM(derived)

    def seal(self, plaintext: bytes, context: bytes) -> bytes:
        salt = os.urandom(_SALT_SIZE)
        return _FORMAT + salt + self._aead(salt).encrypt(_ZERO_NONCE, plaintext, context)

    def unseal(self, sealed: bytes, context: bytes) -> bytes:
        if not sealed.startswith(_FORMAT) or len(sealed) < 1 + _SALT_SIZE + 16:
            raise IntegrityError("a sealed CAS record has an unknown format")
        salt = sealed[1:1 + _SALT_SIZE]
        try:
            return self._aead(salt).decrypt(_ZERO_NONCE, sealed[1 + _SALT_SIZE:], context)
        except InvalidTag:
            raise IntegrityError(
                "a sealed CAS record failed authentication (wrong master key or tampering)"
            ) from None

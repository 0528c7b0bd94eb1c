"""The simulated platform: its Ed25519 key and the ``sim`` evidence it signs.

Wire format (a JSON object)::

    {"tee": "sim",
     "body": base64(canonical JSON of the five body fields below),
     "public_key": base64(raw 32-byte Ed25519 key),
     "signature": base64(Ed25519 signature over the body bytes)}

Body fields: ``measurement`` (64 hex), ``report_data`` (128 hex), ``platform``
(64 hex), ``debug`` (boolean), ``issued_at`` (seconds since the epoch). Canonical
JSON is :func:`tdapp.core.canonical.canonical_json`.
The platform id is the hex SHA-256 of the raw public key. A simulated platform
signs whatever measurement it is asked to, so its evidence protects nothing
against the host's root; it is for development. This module owns the format
and the platform key file; it must never write that key readable by others or
replace a key that exists (the platform id would silently change).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tdapp.attest.binding import REPORT_DATA_SIZE
from tdapp.attest.claims import Tee
from tdapp.core.atomic import WriteMode, write_atomically
from tdapp.core.canonical import canonical_json
from tdapp.errors import InputError
from tdapp.tls import ensure_private_file_mode

TEE = Tee.SIM
EVIDENCE_FIELDS = frozenset({"tee", "body", "public_key", "signature"})
BODY_FIELDS = frozenset({"measurement", "report_data", "platform", "debug", "issued_at"})
PUBLIC_KEY_SIZE = 32
SIGNATURE_SIZE = 64
KEY_FILE = "platform.key"
HEX64 = re.compile(r"[0-9a-f]{64}")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def platform_id(raw_public_key: bytes) -> str:
    """The platform id of a simulated platform: hex SHA-256 of its raw Ed25519 public key."""
    return hashlib.sha256(raw_public_key).hexdigest()


def sign_evidence(key: Ed25519PrivateKey, *, measurement: str, report_data: bytes,
                  debug: bool, issued_at: float) -> dict[str, Any]:
    """Sim evidence for ``measurement`` carrying ``report_data``, signed by ``key``."""
    if not HEX64.fullmatch(measurement):
        raise InputError("measurement must be 64 lower-case hex characters")
    if len(report_data) != REPORT_DATA_SIZE:
        raise InputError(f"report_data must be {REPORT_DATA_SIZE} bytes, got {len(report_data)}")
    raw_public = key.public_key().public_bytes(serialization.Encoding.Raw,
                                               serialization.PublicFormat.Raw)
    body = canonical_json({"measurement": measurement, "report_data": report_data.hex(),
                           "platform": platform_id(raw_public), "debug": bool(debug),
                           "issued_at": float(issued_at)})
    return {"tee": TEE, "body": b64(body), "public_key": b64(raw_public),
            "signature": b64(key.sign(body))}


@dataclass(frozen=True)
class SimPlatform:
    """A simulated platform: the LAS's Ed25519 key, kept in ``STATE_DIR/platform.key``."""

    key: Ed25519PrivateKey
    key_path: Path

    def __repr__(self) -> str:
        return f"SimPlatform(platform={self.platform!r}, key_path={str(self.key_path)!r})"

    @property
    def raw_public_key(self) -> bytes:
        return self.key.public_key().public_bytes(serialization.Encoding.Raw,
                                                  serialization.PublicFormat.Raw)

    @property
    def platform(self) -> str:
        return platform_id(self.raw_public_key)

    def evidence(self, *, measurement: str, report_data: bytes, debug: bool,
                 issued_at: float) -> dict[str, Any]:
        return sign_evidence(self.key, measurement=measurement, report_data=report_data,
                             debug=debug, issued_at=issued_at)

    @classmethod
    def load_or_create(cls, state_dir: Path) -> SimPlatform:
        """Load the platform key, making it (mode 0600) on first start; refuse a readable one."""
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = state_dir / KEY_FILE
        if not path.exists():
            _create_key_file(path)
        ensure_private_file_mode(path)
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (OSError, ValueError) as error:
            raise InputError(f"cannot load the platform key {path}: {error}") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise InputError(f"{path} is not an Ed25519 private key")
        return cls(key, path)


def _create_key_file(path: Path) -> None:
    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())
    # Create-only: when two LAS processes start at once, the second finds the
    # first one's key instead of replacing it.
    with contextlib.suppress(FileExistsError):
        write_atomically(path, pem, mode=WriteMode.CREATE_ONLY, permissions=0o600)

"""One-time attestation nonces that cost no database write to issue.

A nonce is ``random(16) || expiry(8) || MAC(16)`` in lower-case hex, the MAC an
HMAC-SHA256 under a key derived from the CAS master key over the session, the
service, the random part and the expiry. Any replica sharing the master key can
check it without a lookup; single use is enforced where the nonce is spent, by
inserting its digest in the same transaction that accepts or refuses the
attestation. Only the one spelling the CAS issued is accepted, and the digest is
taken over the decoded bytes, so no other spelling of a spent nonce (upper case,
padding, a newline) is a new one. This module must never accept a nonce whose
MAC it has not checked in constant time, and never treat an expired nonce as
fresh.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import struct
import time
from dataclasses import dataclass

from tdapp.cas.sealing import MasterKey
from tdapp.errors import RefusedError

NONCE_LIFETIME = 120.0
_RANDOM = 16
_EXPIRY = 8
_MAC = 16
_SIZE = _RANDOM + _EXPIRY + _MAC
_CANONICAL = re.compile(f"[0-9a-f]{{{2 * _SIZE}}}")


@dataclass(frozen=True)
class CheckedNonce:
    """A nonce whose MAC and expiry verified: what is stored when it is spent."""

    digest: str  # SHA-256 hex over the nonce's bytes: the single-use key in the database
    expires_at: float


class NonceMinter:
    def __init__(self, master_key: MasterKey, lifetime: float = NONCE_LIFETIME) -> None:
        self._key = master_key.subkey(b"attestation nonce")
        self._lifetime = lifetime

    def issue(self, session: str, service: str, now: float | None = None) -> tuple[str, float]:
        expires_ms = int(((time.time() if now is None else now) + self._lifetime) * 1000)
        body = os.urandom(_RANDOM) + struct.pack(">Q", expires_ms)
        return (body + self._mac(session, service, body)).hex(), expires_ms / 1000

    def check(self, nonce: str, session: str, service: str,
              now: float | None = None) -> CheckedNonce:
        """The nonce's digest and expiry, or RefusedError naming why it is not acceptable."""
        if _CANONICAL.fullmatch(nonce) is None:
            # bytes.fromhex would also take upper case and spaces: a second spelling of
            # the same nonce must not pass for a nonce not yet spent.
            raise RefusedError(f"unknown nonce: a nonce of this CAS is exactly {2 * _SIZE} "
                               "lower-case hex characters, as issued")
        raw = bytes.fromhex(nonce)
        if not hmac.compare_digest(
                raw[-_MAC:], self._mac(session, service, raw[:-_MAC])):
            raise RefusedError(f"unknown nonce: this CAS did not issue it for {session}/{service}")
        (expires_ms,) = struct.unpack(">Q", raw[_RANDOM:_RANDOM + _EXPIRY])
        if expires_ms / 1000 < (time.time() if now is None else now):
            raise RefusedError("nonce expired")
        return CheckedNonce(spent_digest(raw), expires_ms / 1000)

    def _mac(self, session: str, service: str, body: bytes) -> bytes:
        message = b"".join(struct.pack(">I", len(part)) + part
                           for part in (session.encode(), service.encode(), body))
        return hmac.new(self._key, message, hashlib.sha256).digest()[:_MAC]


def spent_digest(raw: bytes) -> str:
    """The single-use key of a nonce: a function of its bytes only.

    Hashed in the canonical (lower-case hex) spelling, which is what earlier
    versions hashed, so nonces they recorded as spent stay spent.
    """
    return hashlib.sha256(raw.hex().encode("ascii")).hexdigest()

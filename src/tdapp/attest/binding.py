"""The binding of a run's nonce and ephemeral public key into attestation evidence.

The runtime puts ``report_data(nonce, key)`` into its evidence; the CAS
recomputes it from the nonce it issued and the key the runtime presents, and
releases secrets only to that key. Owns this one derivation: it must never
change without a new format version, since both sides must compute the same
64 bytes.
"""

from __future__ import annotations

import base64
import hashlib

from tdapp.core.canonical import canonical_json
from tdapp.errors import InputError

REPORT_DATA_SIZE = 64


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def report_data(nonce: str, public_key_der: bytes) -> bytes:
    """SHA-512 of the canonical JSON ``{"nonce": …, "pubkey": base64url(DER SPKI)}``.

    ``public_key_der`` is the ephemeral key's DER SubjectPublicKeyInfo. The
    JSON is canonical (sorted keys, no spaces, UTF-8) so any implementation
    gets the same bytes; a JSON object rather than plain concatenation so that
    no (nonce, key) pair can collide with another.
    """
    if not nonce.isascii():
        raise InputError("a nonce is ASCII; this one is not")
    document = {"nonce": nonce, "pubkey": _b64url(public_key_der)}
    return hashlib.sha512(canonical_json(document)).digest()

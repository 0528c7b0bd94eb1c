"""The compact JWE that carries a released configuration to the runtime's ephemeral key.

ECDH-ES (direct key agreement, RFC 7518 §4.6) with A256GCM: a fresh P-256 key
per answer, its shared secret with the runtime's key through the Concat KDF
(SHA-256, AlgorithmID "A256GCM", empty PartyUInfo and PartyVInfo, 256 bits),
and AES-256-GCM over the payload with the protected header as associated
data. Built here from ``cryptography`` rather than through jwcrypto, which
spends five times as long on the same answer (key conversions to and from
JWK); the runtime opens it with jwcrypto (:mod:`tdapp.client.key_release`),
and tests/test_cas_release_jwe.py checks both agree. This module must never
reuse an ephemeral key or an IV, and never encrypt to anything but a P-256
public key.
"""

from __future__ import annotations

import base64
import json
import os
import struct

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.concatkdf import ConcatKDFHash

_ENC = b"A256GCM"
_KEY_BITS = 256


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _length_prefixed(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


# AlgorithmID || PartyUInfo || PartyVInfo || SuppPubInfo (RFC 7518 §4.6.2).
_OTHER_INFO = (_length_prefixed(_ENC) + _length_prefixed(b"") + _length_prefixed(b"")
               + struct.pack(">I", _KEY_BITS))


def encrypt_to(recipient: ec.EllipticCurvePublicKey, payload: bytes, content_type: str) -> str:
    """``payload`` as a compact JWE (ECDH-ES, A256GCM) only ``recipient``'s key opens."""
    if not isinstance(recipient.curve, ec.SECP256R1):
        raise ValueError("a configuration is only released to an EC P-256 key")
    ephemeral = ec.generate_private_key(ec.SECP256R1())
    numbers = ephemeral.public_key().public_numbers()
    header = {"alg": "ECDH-ES", "enc": _ENC.decode(), "cty": content_type,
              "epk": {"kty": "EC", "crv": "P-256", "x": _b64(numbers.x.to_bytes(32, "big")),
                      "y": _b64(numbers.y.to_bytes(32, "big"))}}
    protected = _b64(json.dumps(header, separators=(",", ":")).encode("utf-8"))
    shared = ephemeral.exchange(ec.ECDH(), recipient)
    key = ConcatKDFHash(hashes.SHA256(), _KEY_BITS // 8, otherinfo=_OTHER_INFO).derive(shared)
    iv = os.urandom(12)
    sealed = AESGCM(key).encrypt(iv, payload, protected.encode("ascii"))
    ciphertext, tag = sealed[:-16], sealed[-16:]
    return ".".join((protected, "", _b64(iv), _b64(ciphertext), _b64(tag)))

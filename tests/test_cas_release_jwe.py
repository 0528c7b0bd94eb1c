"""The CAS's own ECDH-ES/A256GCM JWE (tdapp.cas.release_jwe) against jwcrypto, as a runtime
opens it: only the recipient's key opens it, any changed byte is refused, and no two answers
share an ephemeral key or an IV."""

from __future__ import annotations

import base64
import json

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from jwcrypto import jwe, jwk
from jwcrypto.common import JWException

from tdapp.cas.release_jwe import encrypt_to


def _open(compact: str, key: ec.EllipticCurvePrivateKey) -> bytes:
    token = jwe.JWE()
    token.deserialize(compact, key=jwk.JWK.from_pyca(key))
    return bytes(token.payload)


def _header(compact: str) -> dict[str, object]:
    part = compact.split(".")[0]
    loaded: dict[str, object] = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    return loaded


def test_jwcrypto_opens_it_with_the_recipient_key() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    compact = encrypt_to(key.public_key(), b'{"secret": "value"}', "application/x")
    assert _open(compact, key) == b'{"secret": "value"}'
    header = _header(compact)
    assert header["alg"] == "ECDH-ES" and header["enc"] == "A256GCM"
    assert header["cty"] == "application/x"


def test_another_key_cannot_open_it() -> None:
    key, other = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    compact = encrypt_to(key.public_key(), b"payload", "application/x")
    with pytest.raises(JWException):
        _open(compact, other)


@pytest.mark.parametrize("part", [0, 2, 3, 4])
def test_a_changed_part_is_refused(part: int) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    parts = encrypt_to(key.public_key(), b"payload of some length", "application/x").split(".")
    raw = bytearray(base64.urlsafe_b64decode(parts[part] + "=" * (-len(parts[part]) % 4)))
    raw[len(raw) // 2] ^= 1
    parts[part] = base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()
    with pytest.raises((JWException, ValueError)):
        _open(".".join(parts), key)


def test_every_answer_has_its_own_ephemeral_key_and_iv() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    answers = [encrypt_to(key.public_key(), b"same", "application/x") for _ in range(20)]
    assert len({json.dumps(_header(a)["epk"]) for a in answers}) == 20
    assert len({a.split(".")[2] for a in answers}) == 20


def test_only_p256_keys() -> None:
    with pytest.raises(ValueError, match="P-256"):
        encrypt_to(ec.generate_private_key(ec.SECP384R1()).public_key(), b"x", "a/b")

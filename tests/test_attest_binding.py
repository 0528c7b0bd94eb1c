"""report_data: the 64 bytes that bind a run's nonce and ephemeral key into its evidence."""

from __future__ import annotations

import hashlib

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given
from hypothesis import strategies as st

from tdapp.attest import report_data
from tdapp.errors import InputError


def der(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)


def test_known_answer_fixes_the_format() -> None:
    # Written out by hand: any change to the canonical JSON breaks every CAS and runtime.
    expected = hashlib.sha512(b'{"nonce":"n1","pubkey":"AQID_w"}').digest()
    assert report_data("n1", b"\x01\x02\x03\xff") == expected


def test_is_64_bytes_and_deterministic() -> None:
    key = der(ec.generate_private_key(ec.SECP256R1()))
    first = report_data("ab" * 32, key)
    assert len(first) == 64
    assert report_data("ab" * 32, key) == first


def test_changes_with_the_nonce() -> None:
    key = der(ec.generate_private_key(ec.SECP256R1()))
    assert report_data("ab" * 32, key) != report_data("ab" * 31 + "ac", key)


def test_changes_with_the_key() -> None:
    one, two = (der(ec.generate_private_key(ec.SECP256R1())) for _ in range(2))
    assert report_data("ab" * 32, one) != report_data("ab" * 32, two)


def test_a_non_ascii_nonce_is_refused() -> None:
    # Nonces are ASCII; refusing others keeps the canonical bytes one form only.
    with pytest.raises(InputError, match="ASCII"):
        report_data("\u00e9", b"")


@given(st.text(st.characters(max_codepoint=127)), st.binary(),
       st.text(st.characters(max_codepoint=127)), st.binary())
def test_different_inputs_give_different_bindings(nonce_a: str, key_a: bytes, nonce_b: str,
                                                  key_b: bytes) -> None:
    same = (nonce_a, key_a) == (nonce_b, key_b)
    assert (report_data(nonce_a, key_a) == report_data(nonce_b, key_b)) == same

"""report_data: the 64 bytes that bind a run's nonce, ephemeral key and workload into
its evidence (binding version 2, docs/attestation.md "The binding")."""

from __future__ import annotations

import hashlib

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given
from hypothesis import strategies as st

from tdapp.attest import Workload, report_data
from tdapp.errors import InputError

WORKLOAD = Workload("ab" * 32, "demo", "application")
VECTOR = ('{"nonce":"n1","pubkey":"AQID_w","version":2,"workload":{"measurement":"'
          + "ab" * 32 + '","service":"application","session":"demo"}}')


def der(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)


def test_known_answer_fixes_the_format() -> None:
    # Written out by hand: any change to the canonical JSON breaks every CAS and runtime.
    expected = hashlib.sha512(VECTOR.encode()).digest()
    assert report_data("n1", b"\x01\x02\x03\xff", WORKLOAD) == expected
    assert expected.hex().startswith("5df0a7691c8777b5")  # the vector in the docs


def test_is_64_bytes_and_deterministic() -> None:
    key = der(ec.generate_private_key(ec.SECP256R1()))
    first = report_data("ab" * 32, key, WORKLOAD)
    assert len(first) == 64
    assert report_data("ab" * 32, key, WORKLOAD) == first


def test_changes_with_the_nonce_and_the_key() -> None:
    one, two = (der(ec.generate_private_key(ec.SECP256R1())) for _ in range(2))
    assert report_data("ab" * 32, one, WORKLOAD) != report_data("ab" * 31 + "ac", one, WORKLOAD)
    assert report_data("ab" * 32, one, WORKLOAD) != report_data("ab" * 32, two, WORKLOAD)


@pytest.mark.parametrize("other", [Workload("cd" * 32, "demo", "application"),
                                   Workload("ab" * 32, "other", "application"),
                                   Workload("ab" * 32, "demo", "other")],
                         ids=["image", "session", "service"])
def test_changes_with_each_part_of_the_workload(other: Workload) -> None:
    # Evidence for one program, session or service is not evidence for another.
    assert report_data("n", b"k", WORKLOAD) != report_data("n", b"k", other)


def test_a_non_ascii_nonce_or_a_bad_workload_is_refused() -> None:
    # Nonces are ASCII; refusing others keeps the canonical bytes one form only.
    with pytest.raises(InputError, match="ASCII"):
        report_data("\u00e9", b"", WORKLOAD)
    with pytest.raises(InputError, match="64 lower-case hex"):
        Workload("AB" * 32, "demo", "application")
    with pytest.raises(InputError, match="session"):
        Workload("ab" * 32, "", "application")


@given(st.text(st.characters(max_codepoint=127)), st.binary(),
       st.text(st.characters(max_codepoint=127)), st.binary(), st.text(min_size=1),
       st.text(min_size=1))
def test_different_inputs_give_different_bindings(nonce_a: str, key_a: bytes, nonce_b: str,
                                                  key_b: bytes, session: str,
                                                  service: str) -> None:
    a, b = Workload("ab" * 32, session, service), Workload("ab" * 32, session + "x", service)
    same = (nonce_a, key_a) == (nonce_b, key_b)
    assert (report_data(nonce_a, key_a, a) == report_data(nonce_b, key_b, a)) == same
    assert report_data(nonce_a, key_a, a) != report_data(nonce_a, key_a, b)

"""Access-policy semantics: CREATOR, ANY, NONE, key hashes, certificates, anonymous clients."""

from __future__ import annotations

import datetime
import hashlib

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tdapp.policy import AccessPolicy, SessionError, parse_session

CREATOR = "c0" * 32
OTHER = "0d" * 32


def make_certificate(common_name: str) -> tuple[str, str]:
    """A self-signed certificate (PEM) and its identity, computed independently here."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
                   .sign(key, hashes.SHA256()))
    spki = key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)
    pem = certificate.public_bytes(serialization.Encoding.PEM).decode("ascii")
    return pem, hashlib.sha256(spki).hexdigest()


def policy(yaml_section: str) -> AccessPolicy:
    return parse_session(f"name: acl\naccess_policy:\n{yaml_section}").access_policy


def indented(pem: str, spaces: int) -> str:
    return "".join(" " * spaces + line + "\n" for line in pem.splitlines())


def test_default_is_creator_only() -> None:
    default = parse_session("name: acl\n").access_policy
    assert default.read == default.update == default.create_sessions == ("CREATOR",)
    for action in ("read", "update", "create_sessions"):
        assert default.allows(action, CREATOR, CREATOR)
        assert not default.allows(action, OTHER, CREATOR)
        assert not default.allows(action, None, CREATOR)


def test_creator_match_ignores_hex_case() -> None:
    assert parse_session("name: acl\n").access_policy.allows("read", CREATOR.upper(), CREATOR)


def test_any_allows_everyone_including_anonymous() -> None:
    anyone = policy("  read: [ANY]\n")
    assert anyone.allows("read", None, CREATOR)
    assert anyone.allows("read", OTHER, CREATOR)
    assert not anyone.allows("update", OTHER, CREATOR)


def test_none_allows_nobody_and_must_stand_alone() -> None:
    nobody = policy("  update: [NONE]\n")
    assert not nobody.allows("update", CREATOR, CREATOR)
    assert not nobody.allows("update", None, CREATOR)
    # create_sessions follows update when not given.
    assert nobody.create_sessions == ("NONE",)
    with pytest.raises(SessionError, match="NONE must be the only entry"):
        policy("  update: [NONE, CREATOR]\n")
    with pytest.raises(SessionError, match="ANY must be the only entry"):
        policy("  read: [ANY, CREATOR]\n")
    with pytest.raises(SessionError, match="empty list allows nobody"):
        policy("  read: []\n")


def test_key_hash_entries() -> None:
    hashed = policy(f"  read: [{OTHER.upper()}]\n")
    assert hashed.read == (OTHER,)  # normalized to lower case
    assert hashed.allows("read", OTHER, CREATOR)
    assert not hashed.allows("read", CREATOR, CREATOR)
    assert not hashed.allows("read", None, CREATOR)
    assert not hashed.allows("read", "not-an-identity", CREATOR)


def test_certificate_entries_stand_for_their_public_key() -> None:
    pem, identity = make_certificate("reader")
    acl = policy(f"  read:\n    - CREATOR\n    - |\n{indented(pem, 6)}")
    assert acl.allows("read", identity, CREATOR)
    assert acl.allows("read", CREATOR, CREATOR)
    assert not acl.allows("read", OTHER, CREATOR)
    assert not acl.allows("update", identity, CREATOR)
    # The same key in a differently formatted block gives the same policy.
    stripped = policy(f"  read:\n    - |-\n{indented(pem, 6)}    - CREATOR\n")
    assert stripped == acl


def test_bad_entries_are_refused_with_their_path() -> None:
    pem, _ = make_certificate("broken")
    damaged = pem.replace(pem.splitlines()[2], "A" * 64)
    with pytest.raises(SessionError, match=r"access_policy\.read\[0\]: not a valid PEM"):
        policy(f"  read:\n    - |\n{indented(damaged, 6)}")
    with pytest.raises(SessionError, match=r"access_policy\.update\[1\]: 'admin' is not"):
        policy("  update: [CREATOR, admin]\n")
    with pytest.raises(SessionError, match="keywords are upper case"):
        policy("  read: [any]\n")
    with pytest.raises(SessionError, match=r"access_policy\.read: expected a list"):
        policy("  read: CREATOR\n")


def test_placeholders_and_delegated_policies_grant_nothing_here() -> None:
    placeholder = policy('  read: ["$$SCONE::reader_hash$$"]\n')
    assert placeholder.read == ("$$SCONE::reader_hash$$",)
    assert not placeholder.allows("read", CREATOR, CREATOR)
    delegated = parse_session("name: acl\naccess_policy: $$SCONE::policy$$\n").access_policy
    assert delegated.delegate == "$$SCONE::policy$$"
    assert not delegated.allows("read", CREATOR, CREATOR)
    assert not delegated.allows("update", None, CREATOR)


def test_unknown_action_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="unknown access-policy action"):
        AccessPolicy().allows("delete", CREATOR, CREATOR)  # type: ignore[arg-type]

"""Sim evidence and its verifier: genuine evidence gives the right claims; every attack fails.

Attacks that change a signed body are re-signed (by another key, or the
platform's own) so that they reach the check meant to catch them.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from tdapp.attest import (
    Claims,
    EvidenceError,
    PlatformIn,
    SimVerifier,
    Workload,
    report_data,
    verifier_for,
)
from tdapp.attest.sim import SimPlatform, platform_id, sign_evidence
from tdapp.core.canonical import canonical_json
from tdapp.errors import ExitCode, RefusedError

KEY = Ed25519PrivateKey.generate()
OTHER_KEY = Ed25519PrivateKey.generate()
MEASUREMENT = "5a" * 32
DATA = report_data("nonce", b"ephemeral key", Workload("c0" * 32, "a session", "a service"))
NOW = 1_700_000_000.0
DROP = object()


def raw(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw,
                                         serialization.PublicFormat.Raw)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


PLATFORM = platform_id(raw(KEY))


def genuine(debug: bool = False) -> dict[str, Any]:
    return sign_evidence(KEY, measurement=MEASUREMENT, report_data=DATA, debug=debug,
                         issued_at=NOW)


def signed(body: bytes, key: Ed25519PrivateKey = KEY) -> dict[str, Any]:
    return {"tee": "sim", "body": b64(body), "public_key": b64(raw(key)),
            "signature": b64(key.sign(body))}


def body_with(**changes: object) -> bytes:
    document: dict[str, object] = {"measurement": MEASUREMENT, "report_data": DATA.hex(),
                                   "platform": PLATFORM, "debug": False, "issued_at": NOW}
    for name, value in changes.items():
        if value is DROP:
            del document[name]
        else:
            document[name] = value
    return canonical_json(document)


def verify(evidence: Any, *, at: float = NOW) -> Claims:
    return verifier_for(evidence).verify(evidence, at=at)


def refused(evidence: Any, fragment: str, *, at: float = NOW) -> str:
    with pytest.raises(EvidenceError) as caught:
        verify(evidence, at=at)
    message = str(caught.value)
    assert fragment in message, message
    assert "\n" not in message
    return message


def flip(text: str, bit: int) -> str:
    data = bytearray(base64.b64decode(text))
    data[bit // 8] ^= 1 << (bit % 8)
    return b64(bytes(data))


# -- genuine evidence ---------------------------------------------------------------------


def test_genuine_evidence_gives_its_claims() -> None:
    claims = verify(genuine())
    assert claims == Claims(tee="sim", measurement=MEASUREMENT, report_data=DATA,
                            platform=PLATFORM, debug=False, tcb_status="UpToDate",
                            advisories=(), issued_at=NOW)


def test_debug_evidence_says_so() -> None:
    assert verify(genuine(debug=True)).debug is True


def test_the_platform_id_is_the_hash_of_the_raw_key(tmp_path: Path) -> None:
    platform = SimPlatform.load_or_create(tmp_path)
    assert platform.platform == hashlib.sha256(platform.raw_public_key).hexdigest()
    evidence = platform.evidence(measurement=MEASUREMENT, report_data=DATA, debug=False,
                                 issued_at=NOW)
    assert verify(evidence).platform == platform.platform
    assert "PRIVATE" not in repr(platform)


def test_the_body_is_canonical_json() -> None:
    body = base64.b64decode(genuine()["body"])
    assert body == canonical_json(json.loads(body))
    assert set(json.loads(body)) == {"measurement", "report_data", "platform", "debug",
                                     "issued_at"}


def test_evidence_error_is_a_refusal() -> None:
    assert issubclass(EvidenceError, RefusedError)
    assert EvidenceError("x").exit_code == ExitCode.REFUSED


# -- forgeries ------------------------------------------------------------------------------


@pytest.mark.parametrize("bit", [0, 7, 200, 511, -1])
def test_a_flipped_bit_in_the_body_breaks_the_signature(bit: int) -> None:
    evidence = genuine()
    size = len(base64.b64decode(evidence["body"])) * 8
    evidence["body"] = flip(evidence["body"], bit % size)
    refused(evidence, "sim evidence has a bad signature")


@pytest.mark.parametrize("bit", [0, 255, 256, 511])
def test_a_flipped_bit_in_the_signature_is_refused(bit: int) -> None:
    evidence = genuine()
    evidence["signature"] = flip(evidence["signature"], bit)
    refused(evidence, "sim evidence has a bad signature")


def test_a_swapped_public_key_is_refused() -> None:
    evidence = genuine()
    evidence["public_key"] = b64(raw(OTHER_KEY))
    refused(evidence, "bad signature")


def test_a_body_naming_this_platform_signed_by_another_key_is_a_platform_mismatch() -> None:
    forged = signed(body_with(), key=OTHER_KEY)
    message = refused(forged, f"sim evidence names platform {PLATFORM}, but its signing key "
                              f"is platform {platform_id(raw(OTHER_KEY))}")
    assert message.count("platform") == 2


def test_a_body_signed_by_another_key_under_the_platform_key_is_refused() -> None:
    forged = signed(body_with(), key=OTHER_KEY)
    forged["public_key"] = b64(raw(KEY))
    refused(forged, "bad signature")


def test_self_consistent_evidence_from_another_key_is_stopped_by_the_platform_policy() -> None:
    # The verifier proves only "some key signed this"; trusting a platform is policy.
    other_platform = platform_id(raw(OTHER_KEY))
    claims = verify(signed(body_with(platform=other_platform), key=OTHER_KEY))
    verdict = PlatformIn([PLATFORM]).verify(claims)
    assert not verdict.ok
    assert verdict.reason == (f"platform {other_platform} is not in the allowed platforms "
                              f"(allowed: {PLATFORM})")


# -- malformed evidence ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["body", "public_key", "signature"])
def test_a_missing_field_is_named(name: str) -> None:
    evidence = genuine()
    del evidence[name]
    refused(evidence, f"sim evidence is missing '{name}'")


def test_several_missing_fields_are_named() -> None:
    refused({"tee": "sim"}, "sim evidence is missing fields 'body', 'public_key', 'signature'")


def test_an_extra_field_is_named() -> None:
    refused({**genuine(), "platform": PLATFORM}, "sim evidence has unexpected field 'platform'")


@pytest.mark.parametrize(("name", "value", "kind"), [
    ("body", 12, "a number"), ("public_key", None, "null"), ("signature", ["x"], "an array"),
    ("body", {"a": 1}, "an object"), ("signature", True, "a boolean")])
def test_a_mistyped_field_is_named(name: str, value: object, kind: str) -> None:
    refused({**genuine(), name: value}, f"sim evidence field '{name}' must be a base64 "
                                        f"string, got {kind}")


@pytest.mark.parametrize("name", ["body", "public_key", "signature"])
@pytest.mark.parametrize("text", ["not base64!", "QUJD\n", "é", "QUJ"])
def test_non_base64_is_refused(name: str, text: str) -> None:
    refused({**genuine(), name: text}, f"sim evidence field '{name}' is not valid base64")


def test_non_canonical_base64_is_refused() -> None:
    # "QUJ=" decodes to "AB" but has a stray bit; canonical is "QUI=".
    refused({**genuine(), "body": "QUJ="}, "field 'body' is not canonical base64")


@pytest.mark.parametrize(("name", "size", "length"), [
    ("public_key", 32, 31), ("public_key", 32, 33), ("signature", 64, 63), ("signature", 64, 0)])
def test_wrong_sizes_are_refused(name: str, size: int, length: int) -> None:
    refused({**genuine(), name: b64(bytes(length))},
            f"sim evidence field '{name}' must hold {size} bytes, got {length}")


def test_an_oversized_field_is_refused_before_decoding() -> None:
    refused({**genuine(), "body": "A" * 100_000}, "field 'body' is too long")


def test_evidence_for_another_tee_is_not_taken_by_the_sim_verifier() -> None:
    with pytest.raises(EvidenceError, match="expected sim evidence, got 'sgx' evidence"):
        SimVerifier().verify({**genuine(), "tee": "sgx"}, at=NOW)


@pytest.mark.parametrize(("body", "fragment"), [
    (b"\xff\xfe", "sim evidence body is not JSON"),
    (b"{", "sim evidence body is not JSON"),
    (b"[1,2]", "sim evidence body must be a JSON object, got an array"),
    (b'"text"', "sim evidence body must be a JSON object, got a string"),
    (body_with().replace(b",", b", "), "sim evidence body is not canonical JSON"),
    (body_with() + b"\n", "sim evidence body is not canonical JSON"),
    (b'{"debug":false,"debug":true}', "sim evidence body has a duplicate key"),
    (b'{"issued_at":NaN}', "sim evidence body holds NaN, which is not JSON"),
    (b"[" * 5000 + b"]" * 5000, "sim evidence body is not JSON"),
])
def test_a_signed_but_malformed_body_is_refused(body: bytes, fragment: str) -> None:
    refused(signed(body), fragment)


@pytest.mark.parametrize("name", ["measurement", "report_data", "platform", "debug",
                                  "issued_at"])
def test_a_missing_body_field_is_named(name: str) -> None:
    refused(signed(body_with(**{name: DROP})), f"sim evidence body is missing '{name}'")


def test_an_extra_body_field_is_named() -> None:
    refused(signed(body_with(tcb_status="UpToDate")),
            "sim evidence body has unexpected field 'tcb_status'")


@pytest.mark.parametrize(("name", "value", "fragment"), [
    ("measurement", "5A" * 32, "field 'measurement' must be 64 lower-case hex characters"),
    ("measurement", "5a" * 31, "field 'measurement' must be 64 lower-case hex characters"),
    ("measurement", 5, "field 'measurement' must be 64 lower-case hex characters"),
    ("report_data", DATA.hex()[:-2], "field 'report_data' must be 128 lower-case hex"),
    ("report_data", "zz" * 64, "field 'report_data' must be 128 lower-case hex"),
    ("platform", None, "field 'platform' must be 64 lower-case hex characters"),
    ("debug", 0, "field 'debug' must be true or false, got a number"),
    ("debug", "false", "field 'debug' must be true or false, got a string"),
    ("issued_at", "now", "field 'issued_at' must be a non-negative number of seconds"),
    ("issued_at", True, "field 'issued_at' must be a non-negative number of seconds"),
    ("issued_at", -1.0, "field 'issued_at' must be a non-negative number of seconds"),
    ("issued_at", 10**400, "field 'issued_at' must be a non-negative number of seconds"),
])
def test_a_mistyped_body_field_is_named(name: str, value: object, fragment: str) -> None:
    refused(signed(body_with(**{name: value})), f"sim evidence body {fragment}")


def test_an_integer_issue_time_is_accepted() -> None:
    assert verify(signed(body_with(issued_at=int(NOW)))).issued_at == NOW


def test_evidence_from_the_future_is_refused() -> None:
    refused(genuine(), "sim evidence is issued 3600 s in the future", at=NOW - 3600)
    assert verify(genuine(), at=NOW - 200).issued_at == NOW


def test_max_age_refuses_old_evidence() -> None:
    with pytest.raises(EvidenceError, match="sim evidence is 601 s old"):
        SimVerifier(max_age=600).verify(genuine(), at=NOW + 601)
    assert SimVerifier(max_age=600).verify(genuine(), at=NOW + 599).issued_at == NOW


# -- choosing a verifier -------------------------------------------------------------------


def test_sim_evidence_gets_the_sim_verifier() -> None:
    verifier = verifier_for(genuine())
    assert isinstance(verifier, SimVerifier)
    assert verifier.tee == "sim"


@pytest.mark.parametrize(("tee", "fragment"), [
    ("sgx", "quote verification failed"), ("tdx", "quote verification failed"),
    ("snp", "unexpected field"),
])
def test_hardware_evidence_goes_to_its_verifier(tee: str, fragment: str) -> None:
    evidence = {"tee": tee, "quote": "AAAA", "collateral": {}}
    assert verifier_for(evidence).tee == tee
    with pytest.raises(EvidenceError) as refusal:
        verifier_for(evidence).verify(evidence, at=0)
    assert fragment in str(refusal.value) or "collateral" in str(refusal.value)


@pytest.mark.parametrize(("evidence", "fragment"), [
    ({"tee": "tpm"}, "'tpm' evidence is not supported (known kinds: sim, sgx, tdx, snp)"),
    ({"tee": "x\ny" * 50}, "evidence is not supported"),
    ({"body": "AAAA"}, "evidence has no 'tee' field naming its kind"),
    ({"tee": 3}, "evidence field 'tee' must be a string, got a number"),
    ([genuine()], "evidence must be a JSON object, got an array"),
    ("sim", "evidence must be a JSON object, got a string"),
    (None, "evidence must be a JSON object, got null"),
])
def test_unknown_or_malformed_kinds_are_refused(evidence: Any, fragment: str) -> None:
    refused(evidence, fragment)


# -- fuzzing ------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                 max_size=4),
    max_leaves=12)
base64ish = st.binary(max_size=80).map(b64) | st.text(alphabet="ABCab+/=\n -_é", max_size=90)
field_values = json_values | base64ish


def shaped_evidence() -> st.SearchStrategy[dict[str, Any]]:
    """Evidence with the right field names (sometimes some missing or extra) and odd values."""
    names = st.sampled_from(["tee", "body", "public_key", "signature", "extra"])
    return st.dictionaries(names, field_values, max_size=5).map(
        lambda fields: {"tee": "sim", **fields})


def mutated_evidence() -> st.SearchStrategy[dict[str, Any]]:
    """Genuine evidence with one field replaced by an arbitrary value."""
    return st.tuples(st.sampled_from(["tee", "body", "public_key", "signature"]),
                     field_values).map(lambda change: {**genuine(), change[0]: change[1]})


@settings(max_examples=400, deadline=None)
@given(json_values | shaped_evidence() | mutated_evidence())
def test_arbitrary_evidence_raises_nothing_but_evidence_error(evidence: Any) -> None:
    try:
        claims = verify(evidence)
    except EvidenceError as error:
        assert str(error) and "\n" not in str(error)
    else:
        assert claims == verify(genuine())


@settings(max_examples=300, deadline=None)
@given(st.one_of(json_values.map(lambda value: json.dumps(value).encode()),
                 st.dictionaries(st.sampled_from(["measurement", "report_data", "platform",
                                                  "debug", "issued_at", "x"]), json_values)
                 .map(lambda document: json.dumps(document, sort_keys=True,
                                                  separators=(",", ":")).encode()),
                 st.binary(max_size=200)))
def test_signed_arbitrary_bodies_raise_nothing_but_evidence_error(body: bytes) -> None:
    try:
        verify(signed(body))
    except EvidenceError as error:
        assert str(error) and "\n" not in str(error)


def test_real_time_is_accepted() -> None:
    evidence = sign_evidence(KEY, measurement=MEASUREMENT, report_data=DATA, debug=False,
                             issued_at=time.time())
    assert verify(evidence, at=time.time()).measurement == MEASUREMENT

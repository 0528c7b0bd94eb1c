"""The CAS's secret values: generation, given values, rendering, migration, storage.

Real cryptography throughout: every PEM a value renders must load with
cryptography, certificates must verify against their issuers (and as a TLS chain),
and nothing a value holds may show in a repr or an error message.
"""

from __future__ import annotations

import base64
import copy
import json
import string
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store

from tdapp.cas.secret_values import (
    SecretValue,
    definition_of,
    make_values,
    values_from_json,
    values_to_json,
)
from tdapp.errors import InputError, IntegrityError, RefusedError
from tdapp.policy import Session, parse_session
from tdapp.policy.references import FORMATS, Rendering

HEAD = """\
name: s1
version: "0.3"
security: {attestation: {mode: none}}
services: [{name: app, command: /bin/true}]
secrets:
"""
ALL_KINDS = """\
  - {name: text, kind: ascii}
  - {name: short, kind: ascii, size: 12}
  - {name: given_text, kind: ascii, value: "hello wörld"}
  - {name: raw, kind: binary}
  - {name: given_raw, kind: binary, value: "00FF10"}
  - {name: key, kind: private-key}
  - {name: ca, kind: x509-ca, common_name: Test CA}
  - {name: leaf, kind: x509, issuer: ca, private_key: key, dns: [a.example, 10.0.0.1],
     san: [b.example], endpoint: server}
  - {name: lone, kind: x509}
  - {name: session_ca, kind: session-ca}
  - {name: fragment, kind: config-fragment, value: {b: 1, a: [x, "é"]}}
  - {name: imported, import: {session: other, secret: x}}
"""
# One secret of each kind, to render every format of FORMATS from.
OF_KIND = {"ascii": "given_text", "binary": "given_raw", "private-key": "key",
           "x509": "leaf", "x509-ca": "ca", "session-ca": "session_ca",
           "config-fragment": "fragment"}


def session(secrets: str) -> Session:
    return parse_session(HEAD + secrets)


@pytest.fixture(scope="module")
def made() -> dict[str, SecretValue]:
    return make_values(session(ALL_KINDS), {})


def cert(value: SecretValue) -> x509.Certificate:
    return x509.load_der_x509_certificate(value.data)


def spki(key: Any) -> bytes:
    return bytes(key.public_bytes(serialization.Encoding.DER,
                                  serialization.PublicFormat.SubjectPublicKeyInfo))


# -- generation --------------------------------------------------------------------------


def test_every_non_imported_secret_gets_a_value_of_its_kind(made: dict[str, SecretValue]
                                                           ) -> None:
    assert "imported" not in made
    assert set(made) == {"text", "short", "given_text", "raw", "given_raw", "key", "ca", "leaf",
                         "lone", "session_ca", "fragment"}
    assert len(made["text"].data) == 32 and len(made["short"].data) == 12
    assert set(made["text"].data.decode()) <= set(string.ascii_letters + string.digits)
    assert made["given_text"].data == "hello wörld".encode()
    assert len(made["raw"].data) == 32 and made["given_raw"].data == b"\x00\xff\x10"
    assert json.loads(made["fragment"].data) == {"a": ["x", "é"], "b": 1}
    assert made["fragment"].render("") == '{"a":["x","\\u00e9"],"b":1}'
    key = serialization.load_der_private_key(made["key"].data, None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"


@pytest.mark.parametrize(("key_type", "check"), [
    ("P-256", lambda k: isinstance(k, ec.EllipticCurvePrivateKey) and k.curve.key_size == 256),
    ("P-384", lambda k: isinstance(k, ec.EllipticCurvePrivateKey) and k.curve.key_size == 384),
    ("Ed25519", lambda k: isinstance(k, ed25519.Ed25519PrivateKey)),
    ("RSA-2048", lambda k: isinstance(k, rsa.RSAPrivateKey) and k.key_size == 2048
     and k.public_key().public_numbers().e == 65537),
    ("RSA-3072", lambda k: isinstance(k, rsa.RSAPrivateKey) and k.key_size == 3072),
])
def test_key_types(key_type: str, check: Any) -> None:
    values = make_values(session(f"  - {{name: k, kind: private-key, key_type: {key_type}}}\n"
                                 "  - {name: c, kind: x509-ca, private_key: k}\n"
                                 "  - {name: l, kind: x509, issuer: c}\n"), {})
    assert check(serialization.load_der_private_key(values["k"].data, None))
    # Each key type can sign (Ed25519 without a separate hash).
    cert(values["l"]).verify_directly_issued_by(cert(values["c"]))


def test_leaf_is_signed_by_its_ca_with_the_named_key(made: dict[str, SecretValue]) -> None:
    leaf, ca = cert(made["leaf"]), cert(made["ca"])
    leaf.verify_directly_issued_by(ca)
    assert made["leaf"].chain == (made["ca"].data,)
    assert spki(leaf.public_key()) == spki(
        serialization.load_der_private_key(made["key"].data, None).public_key())
    assert made["leaf"].key == made["key"].data
    names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["a.example", "b.example"]
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["10.0.0.1"]
    assert list(leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH]
    constraints = leaf.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and not constraints.value.ca
    assert leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "leaf"
    assert leaf.issuer == ca.subject
    # A TLS client's verification accepts the chain for the leaf's names.
    verifier = PolicyBuilder().store(Store([ca])).build_server_verifier(
        x509.DNSName("b.example"))
    assert verifier.verify(leaf, [])[-1] == ca


def test_ca_flags_and_validity(made: dict[str, SecretValue]) -> None:
    now = datetime.now(UTC)
    for name, common_name, days in [("ca", "Test CA", 365), ("session_ca", "s1 session CA", 3650)]:
        ca = cert(made[name])
        constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints)
        usage = ca.extensions.get_extension_for_class(x509.KeyUsage)
        assert constraints.critical and constraints.value.ca
        assert constraints.value.path_length is None
        assert usage.critical and usage.value.key_cert_sign and usage.value.crl_sign
        assert not usage.value.digital_signature
        with pytest.raises(x509.ExtensionNotFound):
            ca.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
        assert ca.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == common_name
        ca.verify_directly_issued_by(ca)  # self-signed
        assert made[name].chain == ()
        assert abs(ca.not_valid_after_utc - (now + timedelta(days=days))) < timedelta(minutes=1)
        assert timedelta(seconds=50) < now - ca.not_valid_before_utc < timedelta(seconds=70)


@pytest.mark.parametrize(("endpoint", "usages"), [
    ("endpoint: client", [ExtendedKeyUsageOID.CLIENT_AUTH]),
    ("endpoint: server", [ExtendedKeyUsageOID.SERVER_AUTH]),
    ("common_name: x", [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
])
def test_endpoint_sets_extended_key_usage(endpoint: str, usages: list[Any]) -> None:
    value = make_values(session(f"  - {{name: c, kind: x509, {endpoint}}}\n"), {})["c"]
    assert list(cert(value).extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
                ) == usages


def test_chain_runs_up_to_the_root() -> None:
    values = make_values(session("  - {name: root, kind: x509-ca}\n"
                                 "  - {name: mid, kind: x509-ca, issuer: root}\n"
                                 "  - {name: leaf, kind: x509, issuer: mid, dns: [x.example]}\n"),
                         {})
    assert values["leaf"].chain == (values["mid"].data, values["root"].data)
    pems = x509.load_pem_x509_certificates(values["leaf"].render("chain").encode())
    assert [p.public_bytes(serialization.Encoding.DER) for p in pems] == [
        values["leaf"].data, values["mid"].data, values["root"].data]
    pems[0].verify_directly_issued_by(pems[1])
    pems[1].verify_directly_issued_by(pems[2])
    verifier = PolicyBuilder().store(Store([pems[2]])).build_server_verifier(
        x509.DNSName("x.example"))
    verifier.verify(pems[0], [pems[1]])


@pytest.mark.parametrize(("text", "lifetime"), [
    ("2 days", timedelta(days=2)), ("1 day", timedelta(days=1)), ("12 hours", timedelta(hours=12)),
    ("3 years", timedelta(days=3 * 365)), ("5d", timedelta(days=5)), ("6h", timedelta(hours=6)),
    ("1y", timedelta(days=365)), ("100 years", timedelta(days=36500))])
def test_valid_for(text: str, lifetime: timedelta) -> None:
    value = make_values(session(f"  - {{name: c, kind: x509, valid_for: {text}}}\n"), {})["c"]
    certificate = cert(value)
    assert certificate.not_valid_after_utc - certificate.not_valid_before_utc == lifetime + (
        timedelta(seconds=60))


@pytest.mark.parametrize("text", ["forever", "101 years", "0 days", "3 weeks", "-1 days"])
def test_bad_valid_for_is_refused(text: str) -> None:
    with pytest.raises(InputError, match="secret 'c': valid_for"):
        make_values(session(f"  - {{name: c, kind: x509-ca, valid_for: '{text}'}}\n"), {})


def test_bad_names_are_refused() -> None:
    with pytest.raises(InputError, match="A-labels"):
        make_values(session("  - {name: c, kind: x509, dns: [bücher.example]}\n"), {})
    with pytest.raises(InputError, match="common_name"):
        make_values(session(f"  - {{name: c, kind: x509, common_name: {'x' * 65}}}\n"), {})
    long_name = parse_session(HEAD.replace("name: s1", f"name: {'n' * 120}")
                              + "  - {name: c, kind: session-ca}\n")
    ca = cert(make_values(long_name, {})["c"])
    assert len(str(ca.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)) <= 64


def test_unsupported_kinds_and_references_are_refused() -> None:
    with pytest.raises(RefusedError, match=r"'p'.*pgp-key"):
        make_values(session("  - {name: p, kind: pgp-key}\n"), {})
    with pytest.raises(InputError, match="'c': private_key 'k' is imported"):
        make_values(session("  - {name: k, import: {session: other, secret: x}}\n"
                            "  - {name: c, kind: x509, private_key: k}\n"), {})
    with pytest.raises(InputError, match="cycle"):
        make_values(session("  - {name: a, kind: x509-ca, issuer: b}\n"
                            "  - {name: b, kind: x509-ca, issuer: a}\n"), {})


# -- rendering ---------------------------------------------------------------------------


def decode(rendering: Rendering, text: str) -> bytes:
    if rendering is Rendering.HEX:
        return bytes.fromhex(text)
    if rendering in (Rendering.BASE32, Rendering.BASE32_NOPAD):
        return base64.b32decode(text + "=" * (-len(text) % 8))
    return base64.b64decode(text, validate=True)


@pytest.mark.parametrize(("kind", "format_name"),
                         [(kind, name) for kind, formats in FORMATS.items() for name in formats])
def test_every_format_renders(made: dict[str, SecretValue], kind: str, format_name: str) -> None:
    value = made[OF_KIND[kind]]
    assert value.kind == kind
    rendering = FORMATS[kind][format_name]
    if rendering is Rendering.RAW:  # bytes: only into an injected file
        assert value.render_bytes(format_name) == value.data
        with pytest.raises(RefusedError, match="only an injected file"):
            value.render(format_name)
        return
    text = value.render(format_name)
    assert value.render_bytes(format_name) == text.encode()
    if rendering in (Rendering.HEX, Rendering.BASE64, Rendering.BASE32, Rendering.BASE32_NOPAD,
                     Rendering.CERTIFICATE_BASE64):
        assert decode(rendering, text) == value.data
        assert rendering is not Rendering.BASE32_NOPAD or "=" not in text
    elif rendering is Rendering.TEXT:
        assert text == ("hello wörld" if kind == "ascii" else json.dumps(
            json.loads(value.data), separators=(",", ":"), sort_keys=True))
    elif rendering is Rendering.CERTIFICATE_PEM:
        assert x509.load_pem_x509_certificate(text.encode()) == cert(value)
    elif rendering is Rendering.CHAIN_PEM:
        assert len(x509.load_pem_x509_certificates(text.encode())) == 1 + len(value.chain)
    elif rendering in (Rendering.PRIVATE_KEY_PEM, Rendering.PRIVATE_KEY_BASE64):
        key = (serialization.load_pem_private_key(text.encode(), None)
               if rendering is Rendering.PRIVATE_KEY_PEM
               else serialization.load_der_private_key(base64.b64decode(text), None))
        assert key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption()) == (value.key or value.data)
    else:
        public = (serialization.load_pem_public_key(text.encode())
                  if rendering is Rendering.PUBLIC_KEY_PEM
                  else serialization.load_der_public_key(base64.b64decode(text)))
        owner = (cert(value).public_key() if value.kind != "private-key"
                 else serialization.load_der_private_key(value.data, None).public_key())
        assert spki(public) == spki(owner)


def test_unknown_formats_are_refused_by_name(made: dict[str, SecretValue]) -> None:
    with pytest.raises(RefusedError, match=r"'raw'.*'bogus'"):
        made["raw"].render("bogus")
    with pytest.raises(RefusedError, match=r"'raw'"):
        made["raw"].render("")  # bytes have no bare text form (render_bytes gives them)
    with pytest.raises(RefusedError, match=r"'key'.*'crt'"):
        made["key"].render("crt")


def test_public(made: dict[str, SecretValue]) -> None:
    assert made["given_text"].public() == "hello wörld"
    assert made["given_raw"].public() == "00ff10"
    assert made["key"].public().startswith("-----BEGIN PUBLIC KEY-----")
    assert made["leaf"].public() == made["leaf"].render("crt")
    assert made["fragment"].public() == made["fragment"].render("")


def test_repr_shows_no_value(made: dict[str, SecretValue]) -> None:
    shown = repr(made) + str(made["key"]) + repr(list(made.values()))
    assert "SecretValue(name='key', kind='private-key')" in shown
    for value in made.values():
        for format_name in FORMATS[value.kind]:
            if FORMATS[value.kind][format_name] is Rendering.RAW:
                continue
            rendered = value.render(format_name)
            assert rendered not in shown
            assert len(rendered) < 60 or rendered[30:60] not in shown
        assert value.data.hex() not in shown


# -- given values ------------------------------------------------------------------------


def pem_value(text: str) -> str:
    return "|\n" + "".join(f"      {line}\n" for line in text.splitlines())


def test_given_private_key_and_certificates(made: dict[str, SecretValue]) -> None:
    values = make_values(session(
        f"  - name: k\n    kind: private-key\n    value: {pem_value(made['key'].render('pem'))}"
        f"  - name: ca\n    kind: x509-ca\n    value: {pem_value(made['ca'].render('crt'))}"
        f"  - name: c\n    kind: x509\n    private_key: k\n    issuer: ca\n"
        f"    value: {pem_value(made['leaf'].render('crt'))}"), {})
    assert values["k"].data == made["key"].data
    assert values["c"].data == made["leaf"].data and values["c"].key == made["key"].data
    assert values["c"].chain == (made["ca"].data,)
    assert values["ca"].key is None
    assert values["ca"].render("publickey") == made["ca"].render("publickey")
    with pytest.raises(RefusedError, match=r"'ca'.*without its private key.*'privatekey'"):
        values["ca"].render("privatekey")


def test_given_values_that_do_not_fit_are_refused(made: dict[str, SecretValue]) -> None:
    leaf, ca = pem_value(made["leaf"].render("crt")), pem_value(made["ca"].render("crt"))
    cases = [
        (f"  - name: k\n    kind: private-key\n    value: {pem_value(made['key'].render('pem'))}"
         "    key_type: Ed25519\n", "not a Ed25519 key"),
        (f"  - {{name: k, kind: private-key}}\n  - name: c\n    kind: x509\n    private_key: k\n"
         f"    value: {leaf}", "not for the key"),
        (f"  - name: c\n    kind: x509-ca\n    value: {leaf}", "not a CA certificate"),
        (f"  - {{name: ca, kind: x509-ca}}\n  - name: c\n    kind: x509\n    issuer: ca\n"
         f"    value: {leaf}", "not issued by issuer 'ca'"),
        (f"  - name: ca\n    kind: x509-ca\n    value: {ca}"
         "  - {name: c, kind: x509, issuer: ca}\n", "given without its private key"),
    ]
    for secrets, message in cases:
        with pytest.raises(InputError, match=message):
            make_values(session(secrets), {})


def test_a_given_private_key_that_does_not_load_is_refused_without_its_value() -> None:
    garbage = "-----BEGIN PRIVATE KEY-----\nTOPSECRETabcdefgh1234\n-----END PRIVATE KEY-----"
    weak = rsa.generate_private_key(65537, 1024).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()).decode()
    for text, hidden in [(garbage, "TOPSECRETabcdefgh1234"), (weak, weak.splitlines()[1])]:
        with pytest.raises(InputError) as raised:
            make_values(session("  - name: k\n    kind: private-key\n"
                                f"    value: {pem_value(text)}"), {})
        assert "secret 'k'" in str(raised.value) and hidden not in str(raised.value)


# -- migration ---------------------------------------------------------------------------


def test_migrate_keeps_only_an_unchanged_definition() -> None:
    kept_doc = session("  - {name: k, kind: private-key, migrate: true}\n"
                       "  - {name: t, kind: ascii}\n"
                       "  - {name: c, kind: x509, private_key: k}\n")
    first = make_values(kept_doc, {})
    second = make_values(kept_doc, first)
    assert second["k"] == first["k"]  # migrate: true, same definition
    assert second["t"].data != first["t"].data  # no migrate: made anew
    # The certificate is remade, but for the kept key.
    assert second["c"].key == first["k"].data and second["c"].data != first["c"].data
    changed = make_values(session("  - {name: k, kind: private-key, migrate: true, "
                                  "key_type: P-384}\n"), first)
    assert changed["k"].data != first["k"].data
    assert changed["k"].definition != first["k"].definition
    not_migrated = make_values(session("  - {name: k, kind: private-key}\n"), first)
    assert not_migrated["k"].data != first["k"].data
    # Whether to migrate is not part of what the value is.
    assert not_migrated["k"].definition == first["k"].definition


def test_definition_ignores_exports_but_not_parameters() -> None:
    plain = session("  - {name: k, kind: ascii, size: 8}\n").secrets[0]
    exported = session("  - {name: k, kind: ascii, size: 8, export_public: true}\n").secrets[0]
    sized = session("  - {name: k, kind: ascii, size: 9}\n").secrets[0]
    assert definition_of(plain) == definition_of(exported) != definition_of(sized)


def test_a_certificate_is_remade_when_its_issuer_was() -> None:
    doc = session("  - {name: ca, kind: x509-ca}\n  - {name: c, kind: x509, issuer: ca}\n")
    first = make_values(doc, {})
    second = make_values(doc, first)
    assert second["ca"].data != first["ca"].data
    assert second["c"].data != first["c"].data and second["c"].chain == (second["ca"].data,)
    cert(second["c"]).verify_directly_issued_by(cert(second["ca"]))


# -- storage -----------------------------------------------------------------------------


def test_json_round_trip(made: dict[str, SecretValue]) -> None:
    for value in made.values():
        assert SecretValue.from_json(json.loads(json.dumps(value.to_json()))) == value
    stored = values_to_json(made)
    assert values_from_json(stored) == made
    assert values_to_json(values_from_json(stored)) == stored


def _tampered(made: dict[str, SecretValue]) -> list[dict[str, Any]]:
    leaf, key = made["leaf"].to_json(), made["key"].to_json()
    changes: list[tuple[dict[str, Any], str, Any]] = [
        (key, "data", "not base64!"), (key, "data", base64.b64encode(b"junk").decode()),
        (key, "kind", "pgp-key"), (key, "kind", ["x509"]), (key, "name", "bad name"),
        (key, "definition", "00"), (key, "chain", leaf["chain"]), (key, "chain", "x"),
        (key, "key", key["data"]), (leaf, "key", made["ca"].to_json()["key"]),
        (leaf, "chain", [key["data"]]), (leaf, "data", key["data"]),
        (made["given_text"].to_json(), "data", base64.b64encode(b"\xff").decode()),
        (made["fragment"].to_json(), "data", base64.b64encode(b'{"b": 1}').decode()),
    ]
    broken = []
    for original, field, replacement in changes:
        item = copy.deepcopy(original)
        item[field] = replacement
        broken.append(item)
    missing = dict(key)
    del missing["definition"]
    return [*broken, missing, {**key, "extra": 1}, "a string"]  # type: ignore[list-item]


def test_malformed_values_are_integrity_errors(made: dict[str, SecretValue]) -> None:
    for item in _tampered(made):
        with pytest.raises(IntegrityError):
            SecretValue.from_json(item)
    stored = json.loads(values_to_json(made))
    renamed = copy.deepcopy(stored)
    renamed["values"]["other"] = renamed["values"].pop("key")
    for document in [b"not json", b"[]", json.dumps({**stored, "format": 2}).encode(),
                     json.dumps(renamed).encode(), json.dumps({"values": {}}).encode()]:
        with pytest.raises(IntegrityError):
            values_from_json(document)

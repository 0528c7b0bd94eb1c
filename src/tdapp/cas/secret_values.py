"""The CAS's secret values: making them, keeping them as JSON, rendering them.

Owns the bytes behind every generated or given secret of a session: how each
kind is made (:func:`make_values`, with cryptography and the OS's randomness
only), the JSON a caller seals to keep them (:func:`values_to_json`), and what a
``$$SCONE::name:format$$`` reference puts in its place (:meth:`SecretValue.render`,
per :data:`tdapp.policy.references.FORMATS`). Imported secrets are another
module's job. This module must never put value bytes in a repr or a message,
never keep a generated value whose definition changed, and never keep a
certificate whose key or issuer was made anew.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import ipaddress
import json
import os
import re
import secrets
import string
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tdapp.core.canonical import canonical_json
from tdapp.errors import InputError, IntegrityError, RefusedError
from tdapp.policy import Secret, Session
from tdapp.policy.references import Rendering, formats_of, rendering_of
from tdapp.policy.values import SECRET_NAME, quoted

KINDS = frozenset({"ascii", "binary", "private-key", "x509", "x509-ca", "session-ca",
                   "config-fragment"})
_CERTIFICATES = frozenset({"x509", "x509-ca", "session-ca"})
_ALPHABET = string.ascii_letters + string.digits
_DEFAULT_SIZE = 32
_LIFETIME = re.compile(r"\s*([0-9]{1,9})\s*(days?|d|hours?|h|years?|y)\s*")
_UNITS = {"d": timedelta(days=1), "h": timedelta(hours=1), "y": timedelta(days=365)}
_MAX_LIFETIME = timedelta(days=36525)  # 100 years
_CN_LIMIT = 64  # X.509's bound for a common name (RFC 5280, ub-common-name)
_JSON_KEYS = frozenset({"name", "kind", "data", "key", "chain", "definition"})
_DEFINITION = re.compile(r"[0-9a-f]{64}")
_JSON_FORMAT = 1
_DER, _PEM = serialization.Encoding.DER, serialization.Encoding.PEM

# The key types a value may hold: those the session language can ask for, and RSA
# of any size from 2048 bits (a given key); nothing that cannot sign a certificate.
SigningKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


@dataclass(frozen=True, slots=True, repr=False)
class SecretValue:
    """One secret's value. ``data`` per kind: ascii UTF-8 text; binary the bytes;
    private-key PKCS#8 DER; certificates DER; config-fragment canonical JSON."""

    name: str
    kind: str
    data: bytes
    key: bytes | None  # certificates: PKCS#8 DER of their key (None: given without one)
    chain: tuple[bytes, ...]  # certificates: issuers' DER, nearest first, up to the root
    definition: str  # sha256 hex of the definition it was made for (definition_of)

    def __repr__(self) -> str:
        return f"SecretValue(name={self.name!r}, kind={self.kind!r})"

    def render(self, format_name: str) -> str:
        """What ``$$SCONE::name:format_name$$`` stands for; RefusedError if it has no such form."""
        rendering = rendering_of(self.kind, format_name)
        if rendering is None:
            raise RefusedError(f"secret {self.name!r} ({self.kind}) has no format "
                               f"{quoted(format_name)} (it has: {formats_of(self.kind)})")
        return self._render(rendering, format_name)

    def public(self) -> str:
        """What ``export_public`` shows: the value itself where it is not a key."""
        if self.kind == "binary":
            return self.data.hex()
        if self.kind == "private-key":
            return self._render(Rendering.PUBLIC_KEY_PEM, "publickey")
        if self.kind in _CERTIFICATES:
            return self._render(Rendering.CERTIFICATE_PEM, "crt")
        return self._render(Rendering.TEXT, "")

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "data": _b64(self.data),
                "key": None if self.key is None else _b64(self.key),
                "chain": [_b64(item) for item in self.chain], "definition": self.definition}

    @classmethod
    def from_json(cls, data: Any) -> SecretValue:
        """The value ``to_json`` gave; IntegrityError if anything in it is malformed."""
        if not isinstance(data, dict) or set(data) != _JSON_KEYS:
            raise IntegrityError("a stored secret value is malformed")
        name, kind, definition = data["name"], data["kind"], data["definition"]
        if not isinstance(name, str) or not SECRET_NAME.fullmatch(name):
            raise IntegrityError("a stored secret value has a malformed name")
        if (not isinstance(kind, str) or kind not in KINDS or not isinstance(definition, str)
                or not _DEFINITION.fullmatch(definition) or not isinstance(data["chain"], list)):
            raise IntegrityError(f"the stored value of secret {name!r} is malformed")
        key = None if data["key"] is None else _unb64(data["key"], name)
        value = cls(name, kind, _unb64(data["data"], name), key,
                    tuple(_unb64(item, name) for item in data["chain"]), definition)
        value._check_consistent()
        return value

    def _render(self, rendering: Rendering, format_name: str) -> str:
        match rendering:
            case Rendering.TEXT if self.kind == "config-fragment":
                return json.dumps(json.loads(self.data), separators=(",", ":"), sort_keys=True)
            case Rendering.TEXT:
                return self.data.decode("utf-8")
            case Rendering.HEX:
                return self.data.hex()
            case Rendering.BASE64 | Rendering.CERTIFICATE_BASE64:
                return _b64(self.data)
            case Rendering.BASE32 | Rendering.BASE32_NOPAD:
                text = base64.b32encode(self.data).decode("ascii")
                return text if rendering is Rendering.BASE32 else text.rstrip("=")
            case Rendering.CERTIFICATE_PEM | Rendering.CHAIN_PEM:
                parts = (self.data, *self.chain) if rendering is Rendering.CHAIN_PEM else (
                    self.data,)
                return "".join(x509.load_der_x509_certificate(item).public_bytes(_PEM).decode(
                    "ascii") for item in parts)
            case Rendering.PRIVATE_KEY_PEM:
                return _key(self._private_key_der(format_name)).private_bytes(
                    _PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
                ).decode("ascii")
            case Rendering.PRIVATE_KEY_BASE64:
                return _b64(self._private_key_der(format_name))
            case Rendering.PUBLIC_KEY_PEM:
                return _spki(self._public_key(), _PEM).decode("ascii")
            case Rendering.PUBLIC_KEY_BASE64:
                return _b64(_spki(self._public_key(), _DER))
        raise RefusedError(f"secret {self.name!r}: format {quoted(format_name)} is not rendered")

    def _private_key_der(self, format_name: str) -> bytes:
        der = self.data if self.kind == "private-key" else self.key
        if der is None:
            raise RefusedError(f"secret {self.name!r} is a certificate given without its "
                               f"private key: format {quoted(format_name)} is not available")
        return der

    def _public_key(self) -> PublicKeyTypes:
        if self.kind in _CERTIFICATES:  # a certificate's public key needs no private key
            return x509.load_der_x509_certificate(self.data).public_key()
        return _key(self.data).public_key()

    def _check_consistent(self) -> None:
        # Rendering must never fail later on stored bytes, so every part is parsed now.
        try:
            if self.kind not in _CERTIFICATES and (self.key is not None or self.chain):
                raise ValueError("only certificates have a key or a chain")
            if self.kind == "ascii":
                self.data.decode("utf-8")
            elif self.kind == "config-fragment" and canonical_json(
                    json.loads(self.data)) != self.data:
                raise ValueError("not canonical JSON")
            elif self.kind == "private-key":
                _key(self.data)
            elif self.kind in _CERTIFICATES:
                certificate = x509.load_der_x509_certificate(self.data)
                for item in self.chain:
                    x509.load_der_x509_certificate(item)
                if self.key is not None and not _same_key(self.key, certificate):
                    raise ValueError("the key does not match the certificate")
        except (ValueError, TypeError, UnsupportedAlgorithm, InputError):
            raise IntegrityError(f"the stored value of secret {self.name!r} is malformed"
                                 ) from None


def definition_of(secret: Secret) -> str:
    """The hash that says whether a kept value was made for this same definition."""
    content = secret.model_dump(mode="json", by_alias=True, exclude_defaults=True)
    for key in ("export", "export_public", "migrate"):  # they do not change the value
        content.pop(key, None)
    return hashlib.sha256(canonical_json(content)).hexdigest()


def make_values(session: Session, kept: Mapping[str, SecretValue]) -> dict[str, SecretValue]:
    """Values for every non-imported secret of ``session``, made at creation or update.

    A generated value is taken from ``kept`` only when the secret says ``migrate:
    true``, the kept value was made for the same definition, and nothing it was made
    from (its key, its issuer) changed; anything else is made anew. Given values are
    taken as written. Imported secrets are skipped (resolved at attestation).
    """
    maker = _Maker(session, kept)
    for secret in session.secrets:
        if not _imported(secret):
            maker.make(secret)
    return {secret.name: maker.made[secret.name] for secret in session.secrets
            if secret.name in maker.made}


def values_to_json(values: Mapping[str, SecretValue]) -> bytes:
    """The canonical JSON a caller seals to keep ``values``."""
    return canonical_json({"format": _JSON_FORMAT,
                           "values": {name: value.to_json() for name, value in values.items()}})


def values_from_json(data: bytes) -> dict[str, SecretValue]:
    """The values ``values_to_json`` wrote; IntegrityError if anything is malformed."""
    try:
        document = json.loads(data)
    except (ValueError, TypeError):
        raise IntegrityError("stored secret values are not JSON") from None
    if (not isinstance(document, dict) or set(document) != {"format", "values"}
            or document["format"] != _JSON_FORMAT or not isinstance(document["values"], dict)):
        raise IntegrityError("stored secret values have an unknown format")
    values = {name: SecretValue.from_json(item) for name, item in document["values"].items()}
    if any(name != value.name for name, value in values.items()):
        raise IntegrityError("stored secret values are filed under the wrong names")
    return values


# -- making ----------------------------------------------------------------------------


def _imported(secret: Secret) -> bool:
    return secret.import_ is not None or secret.import_akv is not None


class _Maker:
    """Makes values in dependency order (keys and issuers before what they sign)."""

    def __init__(self, session: Session, kept: Mapping[str, SecretValue]) -> None:
        self.session = session
        self.kept = kept
        self.made: dict[str, SecretValue] = {}
        self.changed: set[str] = set()  # names whose value is not the kept one
        self._making: set[str] = set()

    def make(self, secret: Secret) -> SecretValue:
        if secret.name in self.made:
            return self.made[secret.name]
        self._making.add(secret.name)
        depends = {key: self._dependency(secret, key, target)
                   for key, target in secret.references().items()}
        definition = definition_of(secret)
        old = self.kept.get(secret.name)
        if (secret.value is None and secret.migrate and old is not None
                and old.kind == secret.kind and old.definition == definition
                and not any(value.name in self.changed for value in depends.values())):
            value = old
        else:
            value = _new_value(secret, definition, depends, self.session.name)
        if value != old:
            self.changed.add(secret.name)
        self._making.discard(secret.name)
        self.made[secret.name] = value
        return value

    def _dependency(self, owner: Secret, key: str, target: str) -> SecretValue:
        secret = self.session.secret(target)
        assert secret is not None  # the session model checks every reference
        if _imported(secret):
            raise InputError(f"secret {owner.name!r}: {key} {target!r} is imported; a "
                             "certificate is made only from this session's own secrets")
        if target in self._making:
            raise InputError(f"secret {owner.name!r}: {key} {target!r} leads back to "
                             "itself (a cycle of issuers)")
        return self.make(secret)


def _new_value(secret: Secret, definition: str, depends: Mapping[str, SecretValue],
               session_name: str) -> SecretValue:
    kind, given, size = secret.kind, secret.value is not None, secret.size or _DEFAULT_SIZE
    key: bytes | None = None
    chain: tuple[bytes, ...] = ()
    if kind == "ascii":
        data = (str(secret.value) if given else "".join(
            secrets.choice(_ALPHABET) for _ in range(size))).encode("utf-8")
    elif kind == "binary":
        data = bytes.fromhex(str(secret.value)) if given else os.urandom(size)
    elif kind == "private-key":
        data = _given_key(secret) if given else _der(_generate_key(secret.key_type or "P-256"))
    elif kind == "config-fragment":
        data = canonical_json(secret.value)
    elif kind in ("x509", "x509-ca") and given:
        data, key, chain = _given_certificate(secret, depends)
    elif kind in _CERTIFICATES:
        data, key, chain = _issue(secret, depends, session_name)
    else:
        raise RefusedError(f"secret {secret.name!r}: tdapp does not make secrets of kind "
                           f"{kind}")
    return SecretValue(secret.name, str(kind), data, key, chain, definition)


def _generate_key(key_type: str) -> SigningKey:
    if key_type in ("RSA-2048", "RSA-3072"):
        return rsa.generate_private_key(65537, int(key_type.removeprefix("RSA-")))
    if key_type == "Ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    return ec.generate_private_key(ec.SECP384R1() if key_type == "P-384" else ec.SECP256R1())


def _key_type(key: SigningKey) -> str:
    if isinstance(key, rsa.RSAPrivateKey):
        return f"RSA-{key.key_size}"
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return {"secp256r1": "P-256", "secp384r1": "P-384"}.get(key.curve.name, key.curve.name)
    return "Ed25519"


def _key(der: bytes) -> SigningKey:
    """The private key of PKCS#8 ``der``; InputError for a type tdapp does not keep."""
    key = serialization.load_der_private_key(der, None)
    if (isinstance(key, rsa.RSAPrivateKey) and key.key_size >= 2048) or isinstance(
            key, ed25519.Ed25519PrivateKey) or (isinstance(
            key, ec.EllipticCurvePrivateKey) and _key_type(key) in ("P-256", "P-384")):
        return key
    raise InputError("unsupported private key type")


def _given_key(secret: Secret) -> bytes:
    # Nothing about the value may go in the message: only that it did not load.
    try:
        loaded = serialization.load_pem_private_key(str(secret.value).strip().encode("utf-8"), None)
        key = _key(loaded.private_bytes(_DER, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption()))
    except (ValueError, TypeError, UnsupportedAlgorithm, InputError):
        raise InputError(f"secret {secret.name!r}: the value is not an unencrypted PEM "
                         "PKCS#8 private key of a supported type (P-256, P-384, Ed25519, "
                         "RSA of 2048 bits or more)") from None
    if secret.key_type is not None and _key_type(key) != secret.key_type:
        raise InputError(f"secret {secret.name!r}: the given key is not a {secret.key_type} key")
    return _der(key)


def _given_certificate(secret: Secret, depends: Mapping[str, SecretValue]
                       ) -> tuple[bytes, bytes | None, tuple[bytes, ...]]:
    certificate = x509.load_pem_x509_certificate(str(secret.value).strip().encode("ascii"))
    name = secret.name
    try:
        is_ca = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if secret.kind == "x509-ca" and not is_ca:
        raise InputError(f"secret {name!r}: the given certificate is not a CA certificate")
    key = depends["private_key"].data if "private_key" in depends else None
    if key is not None and not _same_key(key, certificate):
        raise InputError(f"secret {name!r}: the given certificate is not for the key of "
                         f"private_key {secret.private_key!r}")
    chain: tuple[bytes, ...] = ()
    if "issuer" in depends:  # its chain is only known when the issuer verifiably signed it
        issuer = depends["issuer"]
        try:
            certificate.verify_directly_issued_by(x509.load_der_x509_certificate(issuer.data))
        except (ValueError, TypeError, InvalidSignature):
            raise InputError(f"secret {name!r}: the given certificate was not issued by "
                             f"issuer {issuer.name!r}") from None
        chain = (issuer.data, *issuer.chain)
    return certificate.public_bytes(_DER), key, chain


def _issue(secret: Secret, depends: Mapping[str, SecretValue], session_name: str
           ) -> tuple[bytes, bytes, tuple[bytes, ...]]:
    name, issuer = secret.name, depends.get("issuer")
    if secret.kind == "session-ca":
        # A session name may be longer than a common name can be; the CN is only a label.
        common_name = f"{session_name[:_CN_LIMIT - 11]} session CA"
        lifetime = timedelta(days=3650)
    else:
        common_name, lifetime = secret.common_name or name, _lifetime(secret)
    key = _key(depends["private_key"].data) if "private_key" in depends else _generate_key(
        "P-256")
    if issuer is not None and issuer.key is None:
        raise InputError(f"secret {name!r}: issuer {issuer.name!r} was given without its "
                         "private key, so it cannot sign")
    signer = key if issuer is None or issuer.key is None else _key(issuer.key)
    try:
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    except ValueError:
        raise InputError(f"secret {name!r}: a common name has 1 to {_CN_LIMIT} characters; "
                         "give a shorter common_name") from None
    now = datetime.now(UTC)
    builder = (x509.CertificateBuilder().subject_name(subject)
               .issuer_name(subject if issuer is None
                            else x509.load_der_x509_certificate(issuer.data).subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - timedelta(seconds=60)).not_valid_after(now + lifetime)
               .add_extension(x509.BasicConstraints(ca=secret.kind != "x509", path_length=None),
                              critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                              critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                   signer.public_key()), critical=False))
    if secret.kind != "x509":
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=False, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
    else:
        usages = {"server": [ExtendedKeyUsageOID.SERVER_AUTH],
                  "client": [ExtendedKeyUsageOID.CLIENT_AUTH]}.get(
            secret.endpoint or "", [ExtendedKeyUsageOID.SERVER_AUTH,
                                    ExtendedKeyUsageOID.CLIENT_AUTH])
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        if hosts := [*secret.dns, *secret.san]:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [_general_name(name, host) for host in hosts]), critical=False)
    algorithm = None if isinstance(signer, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    certificate = builder.sign(signer, algorithm)
    chain = () if issuer is None else (issuer.data, *issuer.chain)
    return certificate.public_bytes(_DER), _der(key), chain


def _lifetime(secret: Secret) -> timedelta:
    if secret.valid_for is None:
        return timedelta(days=365)
    match = _LIFETIME.fullmatch(secret.valid_for)
    lifetime = None if match is None else int(match.group(1)) * _UNITS[match.group(2)[0]]
    if lifetime is None or not timedelta(0) < lifetime <= _MAX_LIFETIME:
        raise InputError(f"secret {secret.name!r}: valid_for {quoted(secret.valid_for)} is "
                         "not a duration like \"90 days\", \"12h\" or \"2 years\" of at most "
                         "100 years")
    return lifetime


def _general_name(secret_name: str, host: str) -> x509.GeneralName:
    with contextlib.suppress(ValueError):
        return x509.IPAddress(ipaddress.ip_address(host))
    try:
        return x509.DNSName(host)
    except ValueError:
        raise InputError(f"secret {secret_name!r}: {quoted(host)} is not an ASCII host name "
                         "or IP address (write international names as A-labels)") from None


# -- encodings -------------------------------------------------------------------------


def _same_key(key_der: bytes, certificate: x509.Certificate) -> bool:
    return _spki(_key(key_der).public_key(), _DER) == _spki(certificate.public_key(), _DER)


def _der(key: SigningKey) -> bytes:
    return key.private_bytes(_DER, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _spki(key: PublicKeyTypes, encoding: serialization.Encoding) -> bytes:
    return key.public_bytes(encoding, serialization.PublicFormat.SubjectPublicKeyInfo)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: object, name: str) -> bytes:
    if not isinstance(text, str):
        raise IntegrityError(f"the stored value of secret {name!r} is malformed")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise IntegrityError(f"the stored value of secret {name!r} is malformed") from None

"""The CAS's secret values: making them, keeping them as JSON, rendering them.

Owns the bytes behind every generated or given secret of a session: how each
kind is made (:func:`make_values`, with cryptography and the OS's randomness
only), the JSON a caller seals to keep them (:func:`values_to_json`), and what a
``$$SCONE::name:format$$`` reference puts in its place (:meth:`SecretValue.render`,
per :data:`tdapp.policy.references.FORMATS`); keys and certificates are made by
:mod:`tdapp.cas.certificates`. Imported secrets are another module's job.
This module must never put value bytes in a repr or a message, never keep a
generated value whose definition changed, and never keep a certificate whose
key or issuer was made anew.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
import secrets
import string
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from tdapp.cas.certificates import (
    generate_key,
    given_certificate,
    given_key,
    issue_certificate,
    key_der,
    load_key,
    same_key,
    spki,
)
from tdapp.core.canonical import canonical_json
from tdapp.errors import InputError, IntegrityError, RefusedError
from tdapp.policy import Secret, Session
from tdapp.policy.references import Rendering, formats_of, rendering_of
from tdapp.policy.values import SECRET_NAME, quoted

KINDS = frozenset({"ascii", "binary", "private-key", "x509", "x509-ca", "session-ca",
                   "config-fragment"})
_CERTIFICATES = frozenset({"x509", "x509-ca", "session-ca"})
_KEYED = _CERTIFICATES | {"private-key"}
_ALPHABET = string.ascii_letters + string.digits
_DEFAULT_SIZE = 32
_JSON_KEYS = frozenset({"name", "kind", "data", "key", "chain", "definition"})
_DEFINITION = re.compile(r"[0-9a-f]{64}")
_JSON_FORMAT = 1
_DER, _PEM = serialization.Encoding.DER, serialization.Encoding.PEM



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

    def render_bytes(self, format_name: str) -> bytes:
        """What the reference puts into an injected file: a binary value's bare form is its
        bytes, every other form its text in UTF-8."""
        if rendering_of(self.kind, format_name) is Rendering.RAW:
            return self.data
        return self.render(format_name).encode("utf-8")

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
                return load_key(self._private_key_der(format_name)).private_bytes(
                    _PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
                ).decode("ascii")
            case Rendering.PRIVATE_KEY_BASE64:
                return _b64(self._private_key_der(format_name))
            case Rendering.PUBLIC_KEY_PEM:
                return spki(self._public_key(), _PEM).decode("ascii")
            case Rendering.PUBLIC_KEY_BASE64:
                return _b64(spki(self._public_key(), _DER))
        if rendering is Rendering.RAW:
            raise RefusedError(f"secret {self.name!r} is binary: its bare form is bytes, which "
                               "only an injected file holds; elsewhere name a format (:hex, "
                               ":base64)")
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
        return load_key(self.data).public_key()

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
                load_key(self.data)
            elif self.kind in _CERTIFICATES:
                certificate = x509.load_der_x509_certificate(self.data)
                for item in self.chain:
                    x509.load_der_x509_certificate(item)
                if self.key is not None and not same_key(self.key, certificate):
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
    _check_work(session)
    maker = _Maker(session, kept)
    for secret in session.secrets:
        if not _imported(secret):
            maker.make(secret)
    return {secret.name: maker.made[secret.name] for secret in session.secrets
            if secret.name in maker.made}


# Making keys is the one costly thing a client can ask of the CAS by writing a short
# document: bounded, so one session cannot keep a CAS worker busy for minutes.
MAX_MADE_KEYS = 64  # keys and certificates made for one session (or one update)
MAX_MADE_RSA_KEYS = 4  # of them RSA (the slow ones to make)


def _check_work(session: Session) -> None:
    made = [secret for secret in session.secrets if not _imported(secret)
            and secret.value is None and secret.kind in _KEYED]
    rsa = [secret for secret in made if (secret.key_type or "").startswith("RSA")]
    if len(made) > MAX_MADE_KEYS or len(rsa) > MAX_MADE_RSA_KEYS:
        raise InputError(f"secrets: the CAS makes at most {MAX_MADE_KEYS} keys and "
                         f"certificates for a session, {MAX_MADE_RSA_KEYS} of them RSA; this "
                         f"one asks for {len(made)} ({len(rsa)} RSA)")


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
        data = given_key(secret) if given else key_der(generate_key(secret.key_type or "P-256"))
    elif kind == "config-fragment":
        data = canonical_json(secret.value)
    elif kind in ("x509", "x509-ca") and given:
        data, key, chain = given_certificate(secret, depends)
    elif kind in _CERTIFICATES:
        data, key, chain = issue_certificate(secret, depends, session_name)
    else:
        raise RefusedError(f"secret {secret.name!r}: tdapp does not make secrets of kind "
                           f"{kind}")
    return SecretValue(secret.name, str(kind), data, key, chain, definition)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: object, name: str) -> bytes:
    if not isinstance(text, str):
        raise IntegrityError(f"the stored value of secret {name!r} is malformed")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise IntegrityError(f"the stored value of secret {name!r} is malformed") from None

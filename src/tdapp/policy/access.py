"""Who may read, update or create sessions below a session: the ``access_policy`` section.

An identity is the 64-hex SHA-256 of a client's public key (DER
SubjectPublicKeyInfo), so a renewed certificate for the same key keeps its
rights. Entries are ``CREATOR``, ``ANY``, ``NONE``, an identity, a PEM
certificate (standing for its key's identity) or a ``$$SCONE::name$$``
placeholder naming a secret that holds one of these. This module decides
``allows`` and must never grant anything it cannot verify here: an unresolved
placeholder, a delegated policy or an anonymous client match nothing but
``ANY``. Identities are compared in constant time.
"""

from __future__ import annotations

import hmac
import re
from functools import lru_cache
from typing import Annotated, Any, Literal

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from pydantic import AfterValidator, model_validator

from tdapp.policy.base import Section
from tdapp.policy.values import Many, Text, fail, is_placeholder, quoted
from tdapp.tls import certificate_key_hash

Identity = str
"""A client identity: the lower-case 64-hex SHA-256 of its public key (DER SPKI)."""

Action = Literal["read", "update", "create_sessions"]

CREATOR = "CREATOR"
ANY = "ANY"
NONE = "NONE"
_KEYWORDS = (CREATOR, ANY, NONE)
_IDENTITY = re.compile(r"[0-9a-f]{64}")
_PEM_BEGIN = "-----BEGIN CERTIFICATE-----"
_ENTRY_KINDS = ("CREATOR, ANY, NONE, a 64-hex key hash, a PEM certificate or a complete "
                "$$SCONE::name$$ placeholder")


def is_identity(value: object) -> bool:
    return isinstance(value, str) and _IDENTITY.fullmatch(value) is not None


def normalize_certificate(text: str) -> str:
    """The certificate's canonical PEM text; a failure message never shows the input."""
    if text.strip().count(_PEM_BEGIN) != 1:
        fail("expected exactly one PEM certificate block")
    try:
        certificate = x509.load_pem_x509_certificate(text.strip().encode("ascii"))
        # Computing the identity now means `allows` can never fail on this entry later.
        certificate_key_hash(certificate)
    except (ValueError, UnicodeEncodeError, UnsupportedAlgorithm):
        fail("not a valid PEM certificate (or its key type is not supported)")
    return certificate.public_bytes(serialization.Encoding.PEM).decode("ascii")


@lru_cache(maxsize=512)
def certificate_identity(pem: str) -> Identity:
    """The identity a (normalized) PEM certificate entry stands for."""
    return certificate_key_hash(x509.load_pem_x509_certificate(pem.encode("ascii")))


def _entry(value: str) -> str:
    if value in _KEYWORDS or is_placeholder(value):
        return value
    if _PEM_BEGIN in value:
        return normalize_certificate(value)
    lowered = value.strip().lower()
    if is_identity(lowered):
        return lowered
    hint = ""
    if value.startswith("$$SCONE::") and not value.endswith("$$"):
        hint = " (the placeholder lacks its closing $$)"
    elif value.upper() in _KEYWORDS:
        hint = f" (keywords are upper case: {value.upper()})"
    fail(f"{quoted(value)} is not {_ENTRY_KINDS}{hint}")


def _entries(values: tuple[str, ...]) -> tuple[str, ...]:
    if not values:
        fail("an empty list allows nobody; write NONE to say so")
    for alone in (ANY, NONE):
        if alone in values and len(set(values)) > 1:
            fail(f"{alone} must be the only entry of its list")
    # Order means nothing to `allows`; sorting keeps the hash independent of it.
    return tuple(sorted(set(values)))


Entries = Annotated[tuple[Annotated[Text, AfterValidator(_entry)], ...], Many,
                    AfterValidator(_entries)]


class AccessPolicy(Section):
    """``access_policy``: the entries allowed to read, update and create nested sessions."""

    read: Entries = (CREATOR,)
    update: Entries = (CREATOR,)
    create_sessions: Entries = (CREATOR,)

    @model_validator(mode="before")
    @classmethod
    def _create_follows_update(cls, data: Any) -> Any:
        # SCONE: when create_sessions is not given, whoever may update may create.
        if isinstance(data, dict) and "create_sessions" not in data and "update" in data:
            return {**data, "create_sessions": data["update"]}
        return data

    def allows(self, action: Action, who: Identity | None, creator: Identity) -> bool:
        """Whether the client ``who`` (None: no client certificate) may do ``action``."""
        if action not in ("read", "update", "create_sessions"):
            raise ValueError(f"unknown access-policy action {action!r}")
        if self.delegate is not None:
            return False  # delegated to a secret this module cannot resolve
        allowed = False
        # Every entry is checked (no early exit), each comparison in constant time.
        for entry in getattr(self, action):
            allowed |= _matches(entry, who, creator)
        return allowed


def _matches(entry: str, who: Identity | None, creator: Identity) -> bool:
    if entry == ANY:
        return True
    if who is None or entry == NONE or is_placeholder(entry):
        return False
    if entry == CREATOR:
        return _same(who, creator)
    if entry.startswith(_PEM_BEGIN):
        return _same(who, certificate_identity(entry))
    return _same(who, entry)


def _same(who: str, expected: str) -> bool:
    return hmac.compare_digest(who.strip().lower().encode("utf-8"),
                               expected.strip().lower().encode("utf-8"))

"""``$$SCONE::name[:format]$$`` references to secrets, and which formats each kind has.

A reference names a secret of the session (given, generated, or imported) and
how its value is written where the reference stands. This module owns the
vocabulary: :data:`FORMATS` (every format, per kind, and what it renders),
:func:`references_in` (the references in a text) and :func:`where_referenced`
(every place of a session that may hold one, as SCONE resolves them: a
service's environment, ``pwd`` and command, and image injection files). It
decides nothing about values: rendering them is :mod:`tdapp.cas.secret_values`'
job, and it must never see one.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum

from tdapp.policy.model import Session
from tdapp.policy.reader import Path


class Rendering(StrEnum):
    """What a reference puts in place of itself."""

    TEXT = "text"  # an ascii value as written; a config fragment as compact JSON
    HEX = "hex"  # the value's bytes, lower-case hex
    BASE64 = "base64"
    BASE32 = "base32"
    BASE32_NOPAD = "base32nopad"
    CERTIFICATE_PEM = "certificate-pem"
    CHAIN_PEM = "chain-pem"  # the certificate, then its issuers up to the root
    CERTIFICATE_BASE64 = "certificate-base64"  # DER
    PRIVATE_KEY_PEM = "private-key-pem"  # PKCS#8
    PRIVATE_KEY_BASE64 = "private-key-base64"  # PKCS#8 DER
    PUBLIC_KEY_PEM = "public-key-pem"  # SubjectPublicKeyInfo
    PUBLIC_KEY_BASE64 = "public-key-base64"  # SubjectPublicKeyInfo DER
    RAW = "raw"  # a binary value's bytes themselves: only an injected file can hold them


_BYTES = {"hex": Rendering.HEX, "base64": Rendering.BASE64, "base32": Rendering.BASE32,
          "base32nopad": Rendering.BASE32_NOPAD}
_KEY = {
    "": Rendering.PRIVATE_KEY_PEM, "pem": Rendering.PRIVATE_KEY_PEM,
    "pkcs8:pem": Rendering.PRIVATE_KEY_PEM, "key": Rendering.PRIVATE_KEY_PEM,
    "privatekey": Rendering.PRIVATE_KEY_PEM, "privatekey:pem": Rendering.PRIVATE_KEY_PEM,
    "privatekey:pkcs8:pem": Rendering.PRIVATE_KEY_PEM,
    "privatekey:base64": Rendering.PRIVATE_KEY_BASE64,
    "publickey": Rendering.PUBLIC_KEY_PEM, "publickey:pem": Rendering.PUBLIC_KEY_PEM,
    "publickey:base64": Rendering.PUBLIC_KEY_BASE64,
}
_CERTIFICATE = {
    **{name: rendering for name, rendering in _KEY.items() if name not in ("", "pem")},
    "": Rendering.CERTIFICATE_PEM, "pem": Rendering.CERTIFICATE_PEM,
    "crt": Rendering.CERTIFICATE_PEM, "crt:pem": Rendering.CERTIFICATE_PEM,
    "crt:base64": Rendering.CERTIFICATE_BASE64, "chain": Rendering.CHAIN_PEM,
    "chain:pem": Rendering.CHAIN_PEM,
}
# Every format of every kind tdapp makes; "" is the bare reference $$SCONE::name$$.
# A binary value's bare form is its bytes, which only an injected file can hold (an
# environment value or a path is text): elsewhere a reference names an encoding.
FORMATS: dict[str, dict[str, Rendering]] = {
    "ascii": {"": Rendering.TEXT, **_BYTES},
    "binary": {"": Rendering.RAW, **_BYTES},
    "private-key": _KEY,
    "x509": _CERTIFICATE,
    "x509-ca": _CERTIFICATE,
    "session-ca": _CERTIFICATE,
    "config-fragment": {"": Rendering.TEXT},
}
ANY_KIND_FORMATS = frozenset(name for formats in FORMATS.values() for name in formats)

# The format follows ':' (language 0.3: name:crt) or '.' (0.2: name.crt, name.key).
_REFERENCE = re.compile(r"\$\$SCONE::([A-Za-z0-9_-]{1,128})((?:[:.][A-Za-z0-9_-]+)*)\$\$")


@dataclass(frozen=True)
class Reference:
    """One ``$$SCONE::secret:format$$`` in a text; ``format`` is "" for a bare reference."""

    text: str
    secret: str
    format: str


def references_in(text: str) -> list[Reference]:
    """Every reference in ``text``, in order (a ``$$SCONE::`` that is not one is left as text)."""
    return [Reference(match.group(0), match.group(1), match.group(2)[1:].replace(".", ":"))
            for match in _REFERENCE.finditer(text)]


def rendering_of(kind: str, format_name: str) -> Rendering | None:
    """What ``format_name`` renders for a secret of ``kind``; None if it has no such format."""
    return FORMATS.get(kind, {}).get(format_name)


def formats_of(kind: str) -> str:
    """The formats of ``kind``, for a message."""
    names = [f":{name}" if name else "(bare)" for name in FORMATS.get(kind, {})]
    return ", ".join(names) or "none"


class Place(StrEnum):
    """Where in a session a reference stands (a command line is public: see enforced)."""

    COMMAND = "command"
    ENVIRONMENT = "environment"
    PWD = "pwd"  # noqa: S105 - the working folder, not a password
    INJECTION_FILE = "injection file"


@dataclass(frozen=True)
class Referenced:
    path: Path
    place: Place
    reference: Reference


def referable_texts(session: Session) -> Iterator[tuple[Path, Place, str]]:
    """Every text of the session's services and images where a reference may stand."""
    for index, service in enumerate(session.services):
        here: Path = ("services", index)
        for word in service.argv():
            yield (*here, "command"), Place.COMMAND, word
        for name, value in service.environment.items():
            yield (*here, "environment", name), Place.ENVIRONMENT, value or ""
        yield (*here, "pwd"), Place.PWD, service.pwd or ""
    for index, image in enumerate(session.images):
        for position, injected in enumerate(image.injection_files):
            yield (("images", index, "injection_files", position, "content"),
                   Place.INJECTION_FILE, injected.content or "")


def where_referenced(session: Session) -> Iterator[Referenced]:
    """Every reference the session's services and images hold, with its path."""
    for path, place, text in referable_texts(session):
        for found in references_in(text):
            yield Referenced(path, place, found)

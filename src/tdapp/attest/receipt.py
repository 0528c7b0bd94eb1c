"""Receipts: the CAS's signed statement of what ran on what, checkable offline.

When an attested instance commits its outputs, the CAS signs a
:class:`Receipt`: which session (and its hash) and service ran, the
measurement, TEE, platform and mode it accepted and the digest of the
evidence, the tags of the volumes it released at the start, each output
volume's tag old → new, and the SHA-256 of the output bundle the runtime
uploaded. It is a compact JWS (ES256, from jwcrypto) whose ``kid`` is the RFC
7638 thumbprint of the CAS's receipt key; the key is published at
``/v1/receipt-key`` and pinned by clients when they pin the CAS.

This module is the one schema both ends use and :func:`verify_receipt`, the
only way a client turns a JWS into a :class:`Receipt`: signature, key, type and
every field are checked, or :class:`~tdapp.errors.IntegrityError` says which
failed. It never signs (the CAS does, :mod:`tdapp.cas.receipts`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Annotated, Literal

from jwcrypto import jwk, jws
from jwcrypto.common import JWException
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tdapp.errors import IntegrityError
from tdapp.policy.security import AttestationMode

RECEIPT_TYPE = "tdapp/receipt/v1"
MEDIA_TYPE = "tdapp-receipt+jws"
ALGORITHM = "ES256"
_HEX64 = r"^[0-9a-f]{64}$"
Tag = Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]


class _Wire(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class OutputMove(_Wire):
    old: Tag | None
    new: Tag


class Receipt(_Wire):
    """What the CAS states about one committed run."""

    type: Literal["tdapp/receipt/v1"] = "tdapp/receipt/v1"
    cas_key: Annotated[str, Field(min_length=16, max_length=128)]  # the signer's thumbprint
    session: str
    session_hash: Annotated[str, Field(pattern=_HEX64)]
    service: str
    mode: AttestationMode
    tee: str
    measurement: str
    platform: str
    evidence_sha256: Annotated[str, Field(pattern=_HEX64)] | None  # None: mode none
    instance: Annotated[str, Field(pattern=_HEX64)]  # SHA-256 of the instance's token
    inputs: dict[str, Tag | None]  # every volume released to the run, at its start
    outputs: dict[str, OutputMove]  # the volumes the run changed
    bundle_sha256: Annotated[str, Field(pattern=_HEX64)] | None
    issued_at: float
    # A worker pool's task id, when the run was one (docs/pool.md).
    label: Annotated[str, Field(max_length=128)] | None = None

    def payload(self) -> bytes:
        return self.model_dump_json().encode("utf-8")

    def describe(self) -> str:
        """One line on who produced it, for a person."""
        return (f"{self.session}/{self.service} (session hash {self.session_hash[:16]}…), "
                f"measurement {self.measurement} on {self.tee} ({self.mode} mode), platform "
                f"{self.platform[:16]}…, key {self.cas_key[:16]}…")


def thumbprint(key: jwk.JWK) -> str:
    """RFC 7638 SHA-256 thumbprint of a receipt key (the receipts' ``kid``)."""
    return str(key.thumbprint())


def public_key_from_json(document: object) -> jwk.JWK:
    """A published receipt key (a public EC P-256 JWK); IntegrityError if it is not one."""
    try:
        key = jwk.JWK(**document) if isinstance(document, dict) else None
    except (JWException, ValueError, TypeError):
        key = None
    if key is None or key.has_private or key.get("kty") != "EC" or key.get("crv") != "P-256":
        raise IntegrityError("the receipt key is not a public EC P-256 JWK")
    return key


def verify_receipt(text: str, keys: Mapping[str, jwk.JWK]) -> Receipt:
    """The receipt ``text`` states, if one of ``keys`` (by thumbprint) signed it."""
    token = jws.JWS()
    try:
        token.deserialize(text.strip())
        header = token.jose_header
    except (JWException, ValueError, TypeError):
        raise IntegrityError("not a receipt: the file is not a compact JWS") from None
    if not isinstance(header, dict) or header.get("alg") != ALGORITHM \
            or header.get("typ") != MEDIA_TYPE:
        raise IntegrityError(f"not a receipt: expected a {MEDIA_TYPE} JWS signed {ALGORITHM}")
    kid = header.get("kid")
    key = keys.get(kid) if isinstance(kid, str) else None
    if key is None:
        raise IntegrityError(f"the receipt is signed by key {kid}, which is not a pinned CAS "
                             "receipt key (pin the CAS with tdapp cas attest, or give --key)")
    try:
        token.verify(key, alg=ALGORITHM)
    except (JWException, ValueError):
        raise IntegrityError("the receipt's signature does not verify: it was changed after "
                             "the CAS signed it") from None
    try:
        receipt = Receipt.model_validate_json(token.payload)
    except (ValidationError, ValueError) as error:
        raise IntegrityError(f"the receipt's statement is malformed: {_first(error)}") from None
    if receipt.cas_key != kid:
        raise IntegrityError("the receipt names another CAS key than the one that signed it")
    return receipt


def _first(error: Exception) -> str:
    if isinstance(error, ValidationError):
        first = error.errors(include_url=False)[0]
        return f"{'.'.join(str(p) for p in first['loc']) or 'document'}: {first['msg']}"
    return str(error)


def receipt_header(kid: str) -> str:
    return json.dumps({"alg": ALGORITHM, "typ": MEDIA_TYPE, "kid": kid})

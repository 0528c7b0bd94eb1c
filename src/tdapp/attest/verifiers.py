"""Evidence verifiers: one interface, one backend per kind of TEE.

:func:`verifier_for` picks the backend from ``evidence["tee"]``; the backend
checks the evidence's whole chain and returns its :class:`Claims`, or raises
:class:`EvidenceError` with the reason. A verifier answers "is this genuine
evidence, and what does it say"; whether that is good enough (which
measurements, platforms, TCB levels) is for the policies in
:mod:`tdapp.attest.policy`. A verifier must never return Claims for anything
it did not check, and must raise nothing but EvidenceError on any input.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NoReturn, Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from tdapp.attest import sim
from tdapp.attest.claims import TEE_KINDS, Claims, EvidenceError, Tee, base64_field
from tdapp.attest.dcap import TEES as DCAP_TEES
from tdapp.attest.dcap import CollateralSource, DcapVerifier
from tdapp.attest.snp import AMD_ARK_SHA256S, SnpVerifier
from tdapp.attest.snp import TEE as SNP_TEE
from tdapp.core.canonical import canonical_json

# Far above any honest evidence; bounds the work done before the signature is checked.
MAX_FIELD_CHARS = 16 * 1024
_LOWER_HEX = frozenset("0123456789abcdef")


class EvidenceVerifier(Protocol):
    """Checks one kind of evidence; ``tee`` names the kind."""

    tee: Tee

    def verify(self, evidence: Mapping[str, Any], *, at: float) -> Claims:
        """The Claims of ``evidence`` checked at time ``at``; raises EvidenceError."""
        ...


@dataclass(frozen=True)
class VerifierSettings:
    """What hardware verifiers need from their operator.

    ``collateral``: where DCAP collateral comes from when the evidence carries none
    (a cache file or a PCCS). ``snp_pinned_arks``: SHA-256 fingerprints of the AMD
    root keys trusted (by default AMD's Milan and Genoa ARKs). ``snp_certificates``:
    configured ``ark``/``ask``/``vcek`` DER certificates, used when the evidence carries none.
    """

    collateral: CollateralSource | None = None
    snp_pinned_arks: tuple[str, ...] = AMD_ARK_SHA256S
    snp_certificates: Mapping[str, bytes] = field(default_factory=dict)


def verifier_for(evidence: Mapping[str, Any],
                 settings: VerifierSettings | None = None) -> EvidenceVerifier:
    """The verifier for ``evidence["tee"]``; EvidenceError for anything unknown or unsupported."""
    if not isinstance(evidence, Mapping):
        raise EvidenceError(f"evidence must be a JSON object, got {_kind(evidence)}")
    tee = evidence.get("tee")
    if tee is None:
        raise EvidenceError("evidence has no 'tee' field naming its kind")
    if not isinstance(tee, str):
        raise EvidenceError(f"evidence field 'tee' must be a string, got {_kind(tee)}")
    settings = settings or VerifierSettings()
    if tee == sim.TEE:
        return SimVerifier()
    if tee in DCAP_TEES:
        return DcapVerifier(tee, collateral=settings.collateral)
    if tee == SNP_TEE:
        return SnpVerifier(pinned_arks=settings.snp_pinned_arks,
                           certificates=settings.snp_certificates)
    raise EvidenceError(f"{_show(tee)} evidence is not supported "
                        f"(known kinds: {', '.join(TEE_KINDS)})")


class SimVerifier:
    """Verifies ``sim`` evidence from a simulated LAS (format: :mod:`tdapp.attest.sim`).

    It checks the Ed25519 signature with the key embedded in the evidence and
    that the platform id is that key's hash. That proves only that *some*
    holder of that key signed the body: which platforms are trusted is the
    CAS's decision (the PlatformIn policy). The signature is checked before
    the body is parsed, so nothing unsigned is ever read as a claim.

    Evidence issued more than ``max_skew`` seconds after ``at`` is refused;
    ``max_age`` (off by default: the CAS's one-time nonce gives freshness)
    refuses evidence older than that.
    """

    tee = sim.TEE

    def __init__(self, *, max_skew: float = 300.0, max_age: float | None = None) -> None:
        self.max_skew = max_skew
        self.max_age = max_age

    def verify(self, evidence: Mapping[str, Any], *, at: float) -> Claims:
        if not isinstance(evidence, Mapping):
            _fail(f"evidence must be a JSON object, got {_kind(evidence)}")
        _exact_fields(evidence, sim.EVIDENCE_FIELDS, "sim evidence")
        if evidence["tee"] != sim.TEE:
            _fail(f"expected sim evidence, got {_show(evidence['tee'])} evidence")
        public_key = _base64_field(evidence, "public_key", sim.PUBLIC_KEY_SIZE)
        signature = _base64_field(evidence, "signature", sim.SIGNATURE_SIZE)
        body = _base64_field(evidence, "body", None)
        try:
            Ed25519PublicKey.from_public_bytes(public_key).verify(signature, body)
        except (InvalidSignature, ValueError):
            _fail("sim evidence has a bad signature")
        claims = _body_claims(body)
        expected_platform = sim.platform_id(public_key)
        if claims.platform != expected_platform:
            _fail(f"sim evidence names platform {claims.platform}, but its signing key is "
                  f"platform {expected_platform}")
        self._check_time(claims.issued_at, at)
        return claims

    def _check_time(self, issued_at: float, at: float) -> None:
        if issued_at - at > self.max_skew:
            _fail(f"sim evidence is issued {issued_at - at:.0f} s in the future "
                  f"(more than the {self.max_skew:.0f} s of clock skew allowed)")
        if self.max_age is not None and at - issued_at > self.max_age:
            _fail(f"sim evidence is {at - issued_at:.0f} s old "
                  f"(at most {self.max_age:.0f} s is accepted)")


def _body_claims(body: bytes) -> Claims:
    try:
        document = json.loads(body.decode("utf-8"), object_pairs_hook=_unique_keys,
                              parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        _fail("sim evidence body is not JSON")
    if not isinstance(document, dict):
        _fail(f"sim evidence body must be a JSON object, got {_kind(document)}")
    # One byte string, one meaning: a signed body must be in the canonical form.
    try:
        canonical = canonical_json(document)
    except (ValueError, RecursionError):
        canonical = b""
    if canonical != body:
        _fail("sim evidence body is not canonical JSON (sorted keys, no spaces)")
    _exact_fields(document, sim.BODY_FIELDS, "sim evidence body")
    measurement = _hex_field(document, "measurement", 64)
    report_data = bytes.fromhex(_hex_field(document, "report_data", 128))
    platform = _hex_field(document, "platform", 64)
    debug = document["debug"]
    if not isinstance(debug, bool):
        _fail(f"sim evidence body field 'debug' must be true or false, got {_kind(debug)}")
    return Claims(tee=sim.TEE, measurement=measurement, report_data=report_data,
                  platform=platform, debug=debug, tcb_status="UpToDate",
                  issued_at=_seconds(document["issued_at"]))


def _seconds(value: object) -> float:
    seconds = math.nan
    if isinstance(value, int | float) and not isinstance(value, bool):
        with contextlib.suppress(OverflowError):  # an integer beyond any float stays NaN
            seconds = float(value)
    if not math.isfinite(seconds) or seconds < 0:
        _fail("sim evidence body field 'issued_at' must be a non-negative number of seconds")
    return seconds


def _exact_fields(document: Mapping[Any, Any], expected: frozenset[str], what: str) -> None:
    present = set(document.keys())
    missing = sorted(expected - present)
    if missing:
        _fail(f"{what} is missing {_names(missing)}")
    extra = sorted(_show(key) for key in present - expected)
    if extra:
        _fail(f"{what} has unexpected {'field' if len(extra) == 1 else 'fields'} "
              f"{', '.join(extra)}")


def _base64_field(evidence: Mapping[str, Any], name: str, size: int | None) -> bytes:
    what = f"sim evidence field '{name}'"
    if not isinstance(evidence[name], str):
        _fail(f"{what} must be a base64 string, got {_kind(evidence[name])}")
    raw = base64_field(evidence[name], what, MAX_FIELD_CHARS)
    if size is not None and len(raw) != size:
        _fail(f"{what} must hold {size} bytes, got {len(raw)}")
    return raw


def _hex_field(document: Mapping[str, Any], name: str, length: int) -> str:
    value = document[name]
    if not isinstance(value, str) or len(value) != length or not set(value) <= _LOWER_HEX:
        _fail(f"sim evidence body field '{name}' must be {length} lower-case hex characters")
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    document = dict(pairs)
    if len(document) != len(pairs):
        _fail("sim evidence body has a duplicate key")
    return document


def _no_constant(name: str) -> NoReturn:
    _fail(f"sim evidence body holds {name}, which is not JSON")


def _fail(reason: str) -> NoReturn:
    raise EvidenceError(reason)


def _names(names: list[str]) -> str:
    quoted = ", ".join(f"'{name}'" for name in names)
    return quoted if len(names) == 1 else f"fields {quoted}"


def _kind(value: object) -> str:
    """The JSON name of a value's type, for messages that must not echo the value."""
    for kind, name in ((bool, "a boolean"), (int | float, "a number"), (str, "a string"),
                       (list | tuple, "an array"), (Mapping, "an object")):
        if isinstance(value, kind):
            return name
    return "null" if value is None else type(value).__name__


def _show(value: object) -> str:
    """A short, one-line rendering of an untrusted value for a message."""
    text = repr(value) if isinstance(value, str) else _kind(value)
    return text if len(text) <= 40 else f"{text[:37]}…'"

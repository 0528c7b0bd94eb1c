"""SGX and TDX evidence: DCAP quotes checked by dcap-qvl, mapped to :class:`Claims`.

dcap-qvl checks the quote's signature by its attestation key, the QE report and
its signature by the PCK certificate, the PCK chain up to Intel's root, the
CRLs, the QE identity and the TCB info, and derives the TCB status and
advisories, all at a given time. This module owns where the collateral comes
from (the evidence, a configured cache file, or a PCCS) and the mapping of the
verified report to Claims (SGX; TDX 1.0, and TDX 1.5 whose body dcap-qvl nests
under ``base``), and the wording of dcap-qvl's refusals. dcap-qvl refuses every
debug enclave and TD itself, with no option to accept one, so no toleration can
admit such a quote. It must never build Claims from a quote dcap-qvl did not
verify, and must raise nothing but :class:`EvidenceError`.

Evidence: ``{"tee": "sgx"|"tdx", "quote": base64, "collateral": {…},
"event_log": [line, …]}`` where ``collateral`` (optional) is dcap-qvl's
QuoteCollateralV3 JSON; it is signed by Intel, so it may travel with the
evidence. ``event_log`` (optional, tdx) is the runtime event log
(:mod:`tdapp.attest.eventlog`): accepted only if it replays to the quote's
RTMR3, and then in ``Claims.runtime_events``.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any, NoReturn

from tdapp.attest.claims import Claims, EvidenceError, Tee, base64_field
from tdapp.attest.eventlog import EventLogError, parse_log, replay

TEES = ("sgx", "tdx")
MAX_QUOTE_BYTES = 64 * 1024
MAX_COLLATERAL_CHARS = 1024 * 1024
_FIELDS = frozenset({"tee", "quote", "collateral", "event_log"})
_SGX_DEBUG = 0x02  # ATTRIBUTES.DEBUG, bit 1 of the first byte
_TD_DEBUG = 0x01  # TDATTRIBUTES.DEBUG, bit 0 of the first byte
# dcap-qvl's report kinds (its ``Report`` enum): an SGX enclave, a TDX 1.0 body (quote v4)
# and a TDX 1.5 body (quote v5). Any other kind is refused rather than guessed at.
_SGX_KIND = "SgxEnclave"
_TD_KINDS = frozenset({"TD10", "TD15"})
_HASH48 = 48  # bytes of MRTD, the RTMRs, MRCONFIGID and MRSERVICETD
_HEX = re.compile(r"[0-9a-fA-F]*")

CollateralSource = Callable[[bytes], str]
"""Given a raw quote, the QuoteCollateralV3 JSON for it (or EvidenceError)."""


def _with_event_log(claims: Claims, lines: object) -> Claims:
    """``claims`` with the runtime event log, which must replay to the quote's RTMR3."""
    if claims.tee is not Tee.TDX:
        _fail("event_log applies to tdx evidence only")
    try:
        events = parse_log(lines)
    except EventLogError as error:
        _fail(f"tdx evidence field 'event_log': {error}")
    replayed = replay(events).hex()
    if replayed != str(claims.values.get("rtmr3", "")).lower():
        _fail(f"the runtime event log does not replay to the quote's RTMR3 (replayed "
              f"{replayed[:16]}…, quote has {str(claims.values.get('rtmr3'))[:16]}…)")
    return dataclasses.replace(claims, runtime_events=tuple(e.line() for e in events))


def collateral_from_file(path: Path) -> CollateralSource:
    """A local collateral cache file: one QuoteCollateralV3 JSON document."""
    def load(_quote: bytes) -> str:
        try:
            return path.read_text(encoding="utf-8")
        except OSError as error:
            raise EvidenceError(f"cannot read the collateral file {path}: "
                                f"{error.strerror}") from None
    return load


def collateral_from_pccs(url: str) -> CollateralSource:
    """Collateral fetched from a PCCS (or Intel's PCS) for the quote's FMSPC."""
    def fetch(quote: bytes) -> str:
        import asyncio

        import dcap_qvl

        try:
            collateral = asyncio.run(dcap_qvl.get_collateral(url, quote))
        except Exception as error:  # the network and the PCCS can fail in many ways
            raise EvidenceError(f"cannot get collateral from {url}: {_one_line(error)}") from None
        return str(collateral.to_json())
    return fetch


class DcapVerifier:
    """Verifies ``sgx`` or ``tdx`` DCAP quotes at a given time."""

    def __init__(self, tee: str, *, collateral: CollateralSource | None = None) -> None:
        if tee not in TEES:
            raise ValueError(f"DcapVerifier is for {' or '.join(TEES)}, not {tee}")
        self.tee = Tee(tee)
        self._collateral = collateral

    def verify(self, evidence: Mapping[str, Any], *, at: float) -> Claims:
        if not isinstance(evidence, Mapping):
            _fail(f"{self.tee} evidence must be a JSON object")
        extra = sorted(str(key) for key in set(evidence) - _FIELDS)
        if extra:
            _fail(f"{self.tee} evidence has unexpected fields {', '.join(extra)}")
        if evidence.get("tee") != self.tee:
            _fail(f"expected {self.tee} evidence")
        quote = _quote(evidence.get("quote"), self.tee)
        claims = verify_quote(quote, self._collateral_text(evidence, quote), at=at,
                              expected_tee=self.tee)
        if "event_log" not in evidence:
            return claims
        return _with_event_log(claims, evidence["event_log"])

    def _collateral_text(self, evidence: Mapping[str, Any], quote: bytes) -> str:
        carried = evidence.get("collateral")
        if carried is not None:
            if not isinstance(carried, Mapping):
                _fail(f"{self.tee} evidence field 'collateral' must be a JSON object")
            text = json.dumps(carried)
            if len(text) > MAX_COLLATERAL_CHARS:
                _fail(f"{self.tee} evidence field 'collateral' is too large")
            return text
        if self._collateral is None:
            _fail(f"no collateral for this {self.tee} quote: the evidence carries none and no "
                  "PCCS or collateral file is configured")
        return self._collateral(quote)


def verify_quote(quote: bytes, collateral_json: str, *, at: float,
                 expected_tee: str | None = None) -> Claims:
    """Verify a raw DCAP quote with its collateral at unix time ``at``; its Claims."""
    import dcap_qvl

    try:
        collateral = dcap_qvl.QuoteCollateralV3.from_json(collateral_json)
    except Exception as error:  # a binding: any exception type may come out
        raise EvidenceError(f"the collateral is not valid QuoteCollateralV3 JSON: "
                            f"{_one_line(error)}") from None
    try:
        verified = dcap_qvl.verify(quote, collateral, int(at))
        document = json.loads(verified.to_json())
    except Exception as error:  # a binding: any exception type may come out
        raise EvidenceError(_reason(error, at, quote, collateral_json)) from None
    if not isinstance(document, Mapping):
        _fail("dcap-qvl returned a report of an unknown shape")
    return _claims(document, expected_tee)


def _claims(document: Mapping[str, Any], expected_tee: str | None) -> Claims:
    report = document.get("report")
    if not isinstance(report, Mapping) or len(report) != 1:
        _fail("dcap-qvl returned a report of an unknown shape")
    (kind, body), = report.items()
    tee = "sgx" if kind == _SGX_KIND else "tdx" if kind in _TD_KINDS else None
    if tee is None or not isinstance(body, Mapping):
        _fail(f"dcap-qvl returned an unknown report kind {str(kind)[:40]!r}")
    if expected_tee is not None and tee != expected_tee:
        _fail(f"the quote is a {tee} quote, not {expected_tee}")
    status = str(document.get("status", ""))
    advisories = tuple(str(item) for item in document.get("advisory_ids") or ())
    platform = str(document.get("ppid", ""))
    if tee == "sgx":
        return _sgx_claims(body, status, advisories, platform)
    return _tdx_claims(kind, body, status, advisories, platform)


def _sgx_claims(body: Mapping[str, Any], status: str, advisories: tuple[str, ...],
                platform: str) -> Claims:
    mrenclave = _hex(body, "mr_enclave", 32)
    values: dict[str, str | int] = {
        "mrenclave": mrenclave, "mrsigner": _hex(body, "mr_signer", 32),
        "isvprodid": _u16(body, "isv_prod_id"), "isvsvn": _u16(body, "isv_svn")}
    debug = bool(bytes.fromhex(_hex(body, "attributes", 16))[0] & _SGX_DEBUG)
    return Claims(tee=Tee.SGX, measurement=mrenclave,
                  report_data=bytes.fromhex(_hex(body, "report_data", 64)), platform=platform,
                  debug=debug, tcb_status=status, advisories=advisories,
                  values=MappingProxyType(values))


def _tdx_claims(kind: str, body: Mapping[str, Any], status: str, advisories: tuple[str, ...],
                platform: str) -> Claims:
    """TD10 is the TDX 1.0 body (quote v4); TD15 (TDX 1.5, quote v5) nests the same
    fields under ``base`` and adds TEE_TCB_SVN2 and MRSERVICETD."""
    base = body
    extra: dict[str, str | int] = {}
    if kind == "TD15":
        nested = body.get("base")
        if not isinstance(nested, Mapping):
            _fail("dcap-qvl returned a TD15 report without its TD10 base")
        base = nested
        extra = {"mrservicetd": _hex(body, "mr_service_td", _HASH48),
                 "teetcbsvn2": _hex(body, "tee_tcb_svn2", 16)}
    mrtd = _hex(base, "mr_td", _HASH48)
    values: dict[str, str | int] = {
        "mrtd": mrtd, "mrconfigid": _hex(base, "mr_config_id", _HASH48),
        **{f"rtmr{i}": _hex(base, f"rt_mr{i}", _HASH48) for i in range(4)},
        **extra}
    debug = bool(bytes.fromhex(_hex(base, "td_attributes", 8))[0] & _TD_DEBUG)
    return Claims(tee=Tee.TDX, measurement=mrtd,
                  report_data=bytes.fromhex(_hex(base, "report_data", 64)), platform=platform,
                  debug=debug, tcb_status=status, advisories=advisories,
                  values=MappingProxyType(values))


def _hex(body: Mapping[str, Any], name: str, size: int) -> str:
    """Field ``name`` of a verified report body: ``size`` bytes as lower-case hex."""
    value = body.get(name)
    if not isinstance(value, str) or len(value) != 2 * size or not _HEX.fullmatch(value):
        _fail(f"dcap-qvl returned a report whose {name} is not {size} bytes of hex")
    return value.lower()


def _u16(body: Mapping[str, Any], name: str) -> int:
    value = body.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 0xFFFF:
        _fail(f"dcap-qvl returned a report whose {name} is not a 16-bit number")
    return value


_EXPIRED = re.compile(r"(\w*)Expired \{ time: UnixTime\((\d+)\), next_update: UnixTime\((\d+)\)")
_NOT_YET = re.compile(r"CertNotValidYet \{ time: UnixTime\((\d+)\), not_before: UnixTime\((\d+)\)")
DEBUG_REFUSED = ("debug-mode quote: dcap-qvl refuses to verify debug enclaves and TDs, so "
                 "tolerate: [debug-mode] cannot admit it (that toleration applies only to sim "
                 "evidence and SEV-SNP reports)")


def _reason(error: BaseException, at: float, quote: bytes, collateral_json: str) -> str:
    """dcap-qvl's error as one line a user can act on."""
    text = _one_line(error).removeprefix("Verification failed: ")
    expired = _EXPIRED.search(text)
    if expired:
        what = {"Crl": "a CRL", "TcbInfo": "the TCB info", "QeIdentity": "the QE identity"}.get(
            expired.group(1), f"the {expired.group(1) or 'collateral'}")
        return (f"the collateral has expired: {what} was valid until "
                f"{_when(int(expired.group(3)))}, verification time {_when(at)}; fetch fresh "
                "collateral")
    not_yet = _NOT_YET.search(text)
    if not_yet:
        return (f"a certificate is not yet valid at the verification time {_when(at)} "
                f"(valid from {_when(int(not_yet.group(2)))}): the quote or its collateral "
                "is newer than that time")
    if "No matching TCB level" in text:
        return ("no matching TCB level found: the platform's TCB is older than every level "
                "the TCB info lists (outdated or revoked platform)")
    if "Debug mode is enabled" in text:
        # dcap-qvl (0.7) has no option to accept debug quotes: the refusal is final.
        return DEBUG_REFUSED
    if "Fmspc mismatch" in text:
        return (f"the collateral is for another platform: its TCB info is for FMSPC "
                f"{_collateral_fmspc(collateral_json)}, the quote's PCK certificate is for "
                f"FMSPC {_quote_fmspc(quote)}; use the collateral for the quote's FMSPC")
    if "Unsupported QE Identity" in text:
        return f"the collateral is for another kind of quote (SGX or TDX): {text}"
    if "UnknownRevocationStatus" in text:
        return ("the revocation status of the quote's PCK certificate chain is unknown: the "
                "collateral's CRLs are not those of the CAs that issued it (the collateral is "
                "for another platform or PCK CA); use the collateral for the quote's FMSPC")
    if "root CA CRL" in text and "InvalidCrlSignature" in text:
        return ("the collateral's root CA CRL is not signed by Intel's SGX Root CA, the root "
                "dcap-qvl trusts: the collateral (and the quote) chain to another root, such "
                "as Intel's test root")
    return f"quote verification failed: {text}"


def _collateral_fmspc(collateral_json: str) -> str:
    try:
        fmspc = json.loads(json.loads(collateral_json)["tcb_info"])["fmspc"]
    except (ValueError, TypeError, KeyError):
        return "(unreadable)"
    return str(fmspc).upper()[:12]


def _quote_fmspc(quote: bytes) -> str:
    import dcap_qvl

    try:  # only to word the refusal: nothing is trusted from the parse
        return str(dcap_qvl.parse_quote(quote).fmspc()).upper()[:12]
    except Exception:  # a binding: any exception type may come out
        return "(unreadable)"


def _when(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _quote(value: object, tee: str) -> bytes:
    return base64_field(value, f"{tee} evidence field 'quote'", MAX_QUOTE_BYTES * 4 // 3 + 4)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())[:300] or type(error).__name__


def _fail(reason: str) -> NoReturn:
    raise EvidenceError(reason)

"""SGX and TDX evidence: DCAP quotes checked by dcap-qvl, mapped to :class:`Claims`.

dcap-qvl checks the quote's signature by its attestation key, the QE report and
its signature by the PCK certificate, the PCK chain up to Intel's root, the
CRLs, the QE identity and the TCB info, and derives the TCB status and
advisories, all at a given time. This module owns where the collateral comes
from (the evidence, a configured cache file, or a PCCS) and the mapping of the
verified report to Claims. It must never build Claims from a quote dcap-qvl did
not verify, and must raise nothing but :class:`EvidenceError`.

Evidence: ``{"tee": "sgx"|"tdx", "quote": base64, "collateral": {…}}`` where
``collateral`` (optional) is dcap-qvl's QuoteCollateralV3 JSON; it is signed by
Intel, so it may travel with the evidence.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any, NoReturn

from tdapp.attest.claims import Claims, EvidenceError, Tee, base64_field

TEES = ("sgx", "tdx")
MAX_QUOTE_BYTES = 64 * 1024
MAX_COLLATERAL_CHARS = 1024 * 1024
_FIELDS = frozenset({"tee", "quote", "collateral"})
_SGX_DEBUG = 0x02  # ATTRIBUTES.DEBUG, bit 1 of the first byte
_TD_DEBUG = 0x01  # TDATTRIBUTES.DEBUG, bit 0 of the first byte

CollateralSource = Callable[[bytes], str]
"""Given a raw quote, the QuoteCollateralV3 JSON for it (or EvidenceError)."""


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
        return verify_quote(quote, self._collateral_text(evidence, quote), at=at,
                            expected_tee=self.tee)

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
        raise EvidenceError(_reason(error, at)) from None
    return _claims(document, expected_tee)


def _claims(document: Mapping[str, Any], expected_tee: str | None) -> Claims:
    report = document.get("report")
    if not isinstance(report, Mapping) or len(report) != 1:
        _fail("dcap-qvl returned a report of an unknown shape")
    (kind, body), = report.items()
    tee = "sgx" if kind == "SgxEnclave" else "tdx" if kind.startswith("TD") else None
    if tee is None or not isinstance(body, Mapping):
        _fail(f"dcap-qvl returned an unknown report kind {kind!r}")
    if expected_tee is not None and tee != expected_tee:
        _fail(f"the quote is a {tee} quote, not {expected_tee}")
    status = str(document.get("status", ""))
    advisories = tuple(str(item) for item in document.get("advisory_ids") or ())
    platform = str(document.get("ppid", ""))
    report_data = bytes.fromhex(str(body["report_data"]))
    if tee == "sgx":
        values: dict[str, str | int] = {
            "mrenclave": str(body["mr_enclave"]), "mrsigner": str(body["mr_signer"]),
            "isvprodid": int(body["isv_prod_id"]), "isvsvn": int(body["isv_svn"])}
        debug = bool(bytes.fromhex(str(body["attributes"]))[0] & _SGX_DEBUG)
        measurement = str(body["mr_enclave"])
    else:
        values = {"mrtd": str(body["mr_td"]), "mrconfigid": str(body["mr_config_id"]),
                  **{f"rtmr{i}": str(body[f"rt_mr{i}"]) for i in range(4)}}
        debug = bool(bytes.fromhex(str(body["td_attributes"]))[0] & _TD_DEBUG)
        measurement = str(body["mr_td"])
    return Claims(tee=Tee(tee), measurement=measurement, report_data=report_data,
                  platform=platform, debug=debug, tcb_status=status, advisories=advisories,
                  values=MappingProxyType(values))


_EXPIRED = re.compile(r"(\w*)Expired \{ time: UnixTime\((\d+)\), next_update: UnixTime\((\d+)\)")


def _reason(error: BaseException, at: float) -> str:
    """dcap-qvl's error as one line a user can act on."""
    text = _one_line(error).removeprefix("Verification failed: ")
    expired = _EXPIRED.search(text)
    if expired:
        what = {"Crl": "a CRL", "TcbInfo": "the TCB info", "QeIdentity": "the QE identity"}.get(
            expired.group(1), f"the {expired.group(1) or 'collateral'}")
        return (f"the collateral has expired: {what} was valid until "
                f"{_when(int(expired.group(3)))}, verification time {_when(at)}; fetch fresh "
                "collateral")
    if "No matching TCB level" in text:
        return ("no matching TCB level found: the platform's TCB is older than every level "
                "the TCB info lists (outdated or revoked platform)")
    return f"quote verification failed: {text}"


def _when(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _quote(value: object, tee: str) -> bytes:
    return base64_field(value, f"{tee} evidence field 'quote'", MAX_QUOTE_BYTES * 4 // 3 + 4)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())[:300] or type(error).__name__


def _fail(reason: str) -> NoReturn:
    raise EvidenceError(reason)

"""``tdapp attest verify``: check a piece of hardware evidence offline and print its claims."""

from __future__ import annotations

import base64
import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from tdapp.attest.claims import Claims, EvidenceError
from tdapp.errors import InputError, UsageError

EVIDENCE_KINDS = ("sgx", "tdx", "snp")
_FILE = click.Path(path_type=Path, dir_okay=False, exists=True)


@click.group()
def attest() -> None:
    """Hardware attestation evidence."""


@attest.command()
@click.argument("evidence_file", type=_FILE)
@click.option("--tee", type=click.Choice(EVIDENCE_KINDS), required=True,
              help="What EVIDENCE_FILE holds: an SGX or TDX DCAP quote, or an SEV-SNP report.")
@click.option("--collateral", type=_FILE, default=None,
              help="SGX/TDX: the quote's collateral (QuoteCollateralV3 JSON).")
@click.option("--vcek", type=_FILE, default=None, help="SNP: the chip's VCEK certificate (DER).")
@click.option("--ask", type=_FILE, default=None, help="SNP: AMD's ASK certificate (DER).")
@click.option("--ark", type=_FILE, default=None,
              help="SNP: AMD's ARK certificate (DER); it must match a pinned root (built in: "
                   "Milan and Genoa; --pin-ark adds one).")
@click.option("--pin-ark", "pin_arks", multiple=True, metavar="SHA256",
              help="SNP: also trust the AMD root whose DER has this SHA-256 (64 hex digits), "
                   "e.g. Turin's, after checking it yourself. Repeatable.")
@click.option("--at", "--verify-at", "at", type=float, default=None, metavar="UNIX_TIME",
              help="Verify as of this time (default: now).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def verify(evidence_file: Path, tee: str, collateral: Path | None, vcek: Path | None,
           ask: Path | None, ark: Path | None, pin_arks: tuple[str, ...], at: float | None,
           as_json: bool) -> None:
    """Verify EVIDENCE_FILE cryptographically and print its claims and TCB status.

    Exits 0 only when the evidence is genuine and its chain valid at the time;
    whether a session accepts it (measurement, tolerations) is the CAS's decision.
    EVIDENCE_FILE is the raw quote or report, or a tdapp evidence JSON document.
    """
    when = time.time() if at is None else at
    try:
        claims = _verify(evidence_file, tee, collateral, vcek, ask, ark, pin_arks, when)
    except EvidenceError as error:
        if as_json:
            # The refusal as services word theirs: a kind and a one-line reason.
            click.echo(json.dumps({"verified": False, "tee": tee, "kind": str(error.kind),
                                   "reason": error.message, "at": when}))
        raise
    if as_json:
        click.echo(json.dumps(_document(claims, when)))
        return
    for key, value in _document(claims, when).items():
        if key == "claims":
            for name, claim in value.items():
                click.echo(f"{name + ':':<18}{claim}")
        else:
            click.echo(f"{key + ':':<18}{', '.join(value) if isinstance(value, list) else value}")


def _verify(evidence_file: Path, tee: str, collateral: Path | None, vcek: Path | None,
            ask: Path | None, ark: Path | None, pin_arks: tuple[str, ...],
            at: float) -> Claims:
    raw = evidence_file.read_bytes()
    if tee == "snp":
        from tdapp.attest.snp import AMD_ARK_SHA256S, SnpVerifier

        certificates = {name: path.read_bytes() for name, path in
                        (("vcek", vcek), ("ask", ask), ("ark", ark)) if path is not None}
        evidence = _document_or(raw, tee, {"tee": "snp", "report": _b64(raw)})
        # A given --ark only supplies the certificate: trust still comes from a pin, and a
        # pin the operator adds is added to AMD's, never in place of them.
        pins = (*AMD_ARK_SHA256S, *(_pin(value) for value in pin_arks))
        return SnpVerifier(pinned_arks=pins, certificates=certificates).verify(evidence, at=at)
    if vcek or ask or ark or pin_arks:
        raise UsageError("--vcek, --ask, --ark and --pin-ark are for --tee snp")
    from tdapp.attest.dcap import DcapVerifier, collateral_from_file

    evidence = _document_or(raw, tee, {"tee": tee, "quote": _b64(raw)})
    if collateral is None and "collateral" not in evidence:
        raise UsageError(f"--tee {tee} needs --collateral FILE (the quote's QuoteCollateralV3 "
                         "JSON), unless the evidence document carries it")
    source = collateral_from_file(collateral) if collateral is not None else None
    return DcapVerifier(tee, collateral=source).verify(evidence, at=at)


def _document_or(raw: bytes, tee: str, fallback: dict[str, Any]) -> dict[str, Any]:
    """A tdapp evidence JSON document if the file is one, else ``fallback``."""
    if not raw.lstrip().startswith(b"{"):
        return fallback
    try:
        document = json.loads(raw)
    except ValueError:
        raise InputError("the evidence file starts like JSON but is not JSON") from None
    if not isinstance(document, dict) or document.get("tee") != tee:
        raise InputError(f"the evidence document is not {tee} evidence")
    return document


def _document(claims: Claims, at: float) -> dict[str, Any]:
    return {
        "verified": True, "tee": claims.tee, "status": claims.tcb_status,
        "advisories": list(claims.advisories), "measurement": claims.measurement,
        "debug": claims.debug, "platform": claims.platform,
        "report_data": claims.report_data.hex(),
        "at": datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "claims": dict(claims.values),
    }


def _pin(value: str) -> str:
    pin = value.strip().lower()
    if len(pin) != 64 or not all(char in "0123456789abcdef" for char in pin):
        raise UsageError(f"--pin-ark {value[:80]!r} is not a SHA-256 fingerprint (64 hex digits)")
    return pin


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")




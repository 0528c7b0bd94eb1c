"""The CAS's checks for a session's fixed mode, judged on verified claims.

Each test is an attack on one promise of tdapp.cas.judging: evidence the session
does not accept is refused by the check that names it, and what a non-reader is
told holds none of the session's expectations.
"""

from __future__ import annotations

from tdapp.attest import Claims, Tee, Workload, report_data
from tdapp.cas.judging import checks_for, public_reason
from tdapp.policy import Session, parse_session
from tdapp.policy.security import AttestationMode

MEASURED = "ab" * 32
PLATFORM = "cd" * 32
NONCE, KEY = "00" * 32, b"key"
WORKLOAD = Workload(MEASURED, "s", "app")


def session(security: str) -> Session:
    return parse_session(f"""
name: s
version: "0.3"
services:
  - name: app
    mrenclaves: [{MEASURED}]
    command: /app
{security}
""")


def first_refusal(doc: Session, mode: AttestationMode, evidence: Claims) -> str | None:
    service = doc.service("app")
    assert service is not None
    for label, policy in checks_for(doc, service, mode, NONCE, KEY, WORKLOAD, evidence.tee):
        if not policy.verify(evidence).ok:
            return label
    return None


def claims(**values: object) -> Claims:
    fields: dict[str, object] = {
        "tee": Tee.SGX, "measurement": MEASURED, "report_data": report_data(NONCE, KEY, WORKLOAD),
        "platform": PLATFORM, "debug": False, "tcb_status": "UpToDate"}
    fields.update(values)
    return Claims(**fields)  # type: ignore[arg-type]


def test_a_hardware_session_refuses_sim_evidence() -> None:
    doc = session("security: {attestation: {mode: hardware}}")
    assert first_refusal(doc, AttestationMode.HARDWARE, claims(tee=Tee.SIM)) == "tee"
    assert first_refusal(doc, AttestationMode.HARDWARE, claims()) is None


def test_a_sim_session_accepts_only_the_platforms_it_names() -> None:
    named = session(f"security: {{attestation: {{mode: sim, platforms: [{PLATFORM}]}}}}")
    assert first_refusal(named, AttestationMode.SIM, claims(tee=Tee.SIM)) is None
    forged = claims(tee=Tee.SIM, platform="ef" * 32)  # signed by the attacker's own key
    assert first_refusal(named, AttestationMode.SIM, forged) == "platform"
    # A sim session that somehow names no platform accepts none (never "any").
    unnamed = session("security: {attestation: {mode: sim}}")
    assert first_refusal(unnamed, AttestationMode.SIM, claims(tee=Tee.SIM)) == "platform"


def test_advisory_tolerations_accept_their_advisory_only() -> None:
    igpu, aepic = "INTEL-SA-00219", "INTEL-SA-00657"
    strict = session("security: {attestation: {mode: hardware}}")
    tolerant = session("security: {attestation: {mode: hardware, tolerate: [insecure-igpu]}}")
    for doc, advisories, refused in [(strict, (igpu,), "tcb"), (tolerant, (igpu,), None),
                                     (tolerant, (aepic,), "tcb"), (tolerant, (igpu, aepic),
                                                                     "tcb")]:
        assert first_refusal(doc, AttestationMode.HARDWARE,
                             claims(advisories=advisories)) == refused, (doc, advisories)
    both = session("security: {attestation: {mode: hardware, "
                   "tolerate: [insecure-igpu, aepic-leak]}}")
    assert first_refusal(both, AttestationMode.HARDWARE,
                         claims(advisories=(igpu, aepic))) is None


def test_public_reasons_hold_nothing_the_session_expects() -> None:
    doc = session(f"security: {{attestation: {{mode: sim, platforms: [{PLATFORM}], "
                  "tolerate: [debug-mode]}}")
    service = doc.service("app")
    assert service is not None
    seen = claims(tee=Tee.SIM, measurement="11" * 32, platform="22" * 32,
                  tcb_status="OutOfDate", debug=True, report_data=b"\x01" * 64)
    theirs = Workload("33" * 32, "s", "app")  # what the caller says it runs
    for label, policy in checks_for(doc, service, AttestationMode.SIM, NONCE, KEY, theirs,
                                    seen.tee):
        verdict = policy.verify(seen)
        told = public_reason(label, seen, verdict.reason or "-", theirs.measurement)
        assert MEASURED not in told and PLATFORM not in told and "debug-mode]" not in told

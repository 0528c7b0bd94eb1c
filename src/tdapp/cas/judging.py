"""How the CAS judges verified evidence against a session: the checks, and what a
refusal may say.

:func:`checks_for` builds the session's policies (:mod:`tdapp.attest.policy`)
for its fixed mode, in the order they are judged and logged. A failed check
becomes :class:`CheckFailed`, carrying the full reason (what the session
expected: for the audit log and the session's readers) and a public one
(:func:`public_reason`: which check, and only the caller's own values). This
module builds policies; it must never decide to release anything itself, and a
public reason must never contain anything the session holds.
"""

from __future__ import annotations

from typing import Any, assert_never

from tdapp.attest import (
    HARDWARE_TEES,
    VM_TEES,
    AllOf,
    AnyOf,
    Claims,
    ClaimsMatch,
    DebugTolerated,
    LoggedWorkloadIs,
    MeasurementIn,
    PlatformIn,
    Policy,
    ReportDataIs,
    SgxSignerIs,
    TcbStatusTolerated,
    Tee,
    TeeIn,
    Workload,
    WorkloadIn,
    WorkloadIsMeasured,
    report_data,
)
from tdapp.errors import RefusedError
from tdapp.policy import Service, Session
from tdapp.policy.security import AttestationMode

# Tolerations that accept one named Intel advisory each (the others are TCB statuses).
ADVISORY_TOLERATIONS = {"insecure-igpu": "INTEL-SA-00219", "aepic-leak": "INTEL-SA-00657"}


def checks_for(session: Session, service: Service, mode: AttestationMode, nonce: str,
               public_key_der: bytes, workload: Workload, tee: Tee, *,
               runtime_events: bool = False) -> list[tuple[str, Policy]]:
    """The session's checks for verified evidence of ``tee``, in the order they are
    judged and logged (``mode`` is ``hardware`` or ``sim``).

    Where the platform measures the program itself (``sgx``: MRENCLAVE; ``sim``:
    what the LAS signed) ``mrenclaves`` pin that measurement; in a confidential VM
    (``tdx``, ``snp``) the hardware measures the VM, and a variant's ``mrenclave``
    pins the workload the evidence binds. The binding of nonce, key and workload
    comes last, so a refusal for it shows that the evidence passed every check of
    the program and the platform first. A TDX guest that logged its runtime
    events (``runtime_events``: the log replayed to RTMR3) must have logged the
    bound workload last.
    """
    attestation = session.security.attestation
    match mode:
        case AttestationMode.HARDWARE:
            tees: frozenset[Tee] = HARDWARE_TEES
        case AttestationMode.SIM:
            tees = frozenset(Tee)
        case AttestationMode.NONE | AttestationMode.MAA:
            raise ValueError(f"mode {mode} has no evidence checks")
        case unreachable:
            assert_never(unreachable)
    ignored = _advisories(attestation.ignore_advisories)
    if ignored != "*":
        ignored = (*ignored, *(advisory for toleration, advisory in
                               ADVISORY_TOLERATIONS.items()
                               if toleration in attestation.tolerate))
    checks: list[tuple[str, Policy]] = [
        ("tee", TeeIn(tees, mode=str(mode))),
        ("measurement", _variants(service, workload.measurement)),
        *_image_measurements(session, service, workload.measurement, tee),
        ("debug", DebugTolerated("debug-mode" in attestation.tolerate)),
        ("tcb", TcbStatusTolerated(attestation.tolerate, ignored)),
    ]
    if attestation.platforms or mode is AttestationMode.SIM:
        # A sim session always names its LAS platforms (fixed at creation): an
        # empty list here accepts no platform at all.
        checks.append(("platform", PlatformIn(attestation.platforms)))
    if tee is Tee.TDX and runtime_events:
        checks.append(("rtmr3", LoggedWorkloadIs(workload)))
    if tee is Tee.SIM:
        # A LAS signs what it is asked: the workload bound must be what it measured.
        checks.append(("workload", WorkloadIsMeasured(workload.measurement)))
    checks.append(("report_data", ReportDataIs(report_data(nonce, public_key_der, workload))))
    return checks


class CheckFailed(RefusedError):
    """A check of the session refused the evidence: ``message`` says what the session
    expected (for the audit log and readers), ``public`` only what was refused."""

    def __init__(self, label: str, reason: str, public: str) -> None:
        super().__init__(reason)
        self.label = label
        self.public = public


def public_reason(label: str, claims: Claims, reason: str, workload: str) -> str:
    """What a refused caller who is not a reader may learn: the check, and its own values
    (``workload``: the measurement its request names)."""
    program = f"measurement {claims.measurement}" + (
        f" running workload {workload}" if claims.tee in VM_TEES else "")
    shown = {
        "tee": f"{claims.tee} evidence is not accepted for this session",
        "measurement": f"{program} is not one this service accepts",
        "image_measurement": f"{program} is not one the service's image accepts",
        "workload": reason,  # the caller's own two values
        "debug": "debug-mode evidence is not tolerated by this session",
        "tcb": f"the platform's TCB status {claims.tcb_status}"
               + (f" (advisories {', '.join(claims.advisories)})" if claims.advisories else "")
               + " is not tolerated by this session",
        "platform": f"platform {claims.platform} is not one this session names",
        "report_data": reason,  # made of this request's nonce and key only
    }
    reason = shown.get(label, f"the evidence fails the session's {label} check")
    return (f"attestation refused: {reason}; the session's readers find the full reason in "
            "its audit log")


def _variants(service: Service, workload: str) -> Policy:
    """Any one of the service's attestation variants, each the AllOf of its factors."""
    variants: list[Policy] = []
    for variant in service.attestation_variants():
        factors: list[Policy] = []
        if variant.mrenclave and (variant.tdx is not None or variant.snp is not None):
            # A confidential VM's variant: the VM's registers below, the workload here.
            factors.append(WorkloadIn(variant.mrenclave, workload))
        elif variant.mrenclave:
            factors.append(MeasurementIn(variant.mrenclave))
        if variant.signer is not None:
            signer = variant.signer
            factors.append(SgxSignerIs(signer.mrsigner, signer.isvprodid, isvsvn=signer.isvsvn,
                                       isvsvn_min=signer.isvsvn_min,
                                       isvsvn_max=signer.isvsvn_max))
        if variant.tdx is not None:
            factors.append(ClaimsMatch("tdx", variant.tdx.expected()))
        if variant.snp is not None:
            factors.append(ClaimsMatch("snp", variant.snp.expected()))
        variants.append(factors[0] if len(factors) == 1 else AllOf(factors))
    if not variants:
        return MeasurementIn(())  # refuses, naming that no measurement is listed
    return variants[0] if len(variants) == 1 else AnyOf(variants)


def _image_measurements(session: Session, service: Service, workload: str,
                        tee: Tee) -> list[tuple[str, Policy]]:
    """The 2018 form lists ``mrenclaves`` on the image too: code must match both."""
    image = session.image(service.image_name) if service.image_name else None
    if image is None or not image.mrenclaves:
        return []
    if tee in VM_TEES:
        return [("image_measurement", WorkloadIn(image.mrenclaves, workload))]
    return [("image_measurement", MeasurementIn(image.mrenclaves))]


def _advisories(value: object) -> Any:
    return "*" if value == "*" or (isinstance(value, tuple) and "*" in value) else tuple(
        value if isinstance(value, tuple) else ())



"""Attestation evidence: producing it (the LAS) and verifying it (verifiers and policies).

The flow: the runtime binds the CAS's nonce and its ephemeral key into
``report_data`` (:mod:`.binding`); a platform signs evidence carrying it (the
simulated LAS, :mod:`.las` and :mod:`.sim`; hardware attesters in :mod:`.attesters`); the CAS
picks a verifier by the evidence's kind (:func:`verifier_for`), which checks
the whole chain and returns :class:`Claims`, then judges those with policies
(:mod:`.policy`). This package must never report evidence as verified unless its
whole chain was checked, and never let a failure pass as anything but an
:class:`EvidenceError` or a failed :class:`Verdict` with its reason.
The LAS (aiohttp) is not imported here, to keep the verifying side light.
"""

from tdapp.attest.binding import REPORT_DATA_SIZE, Workload, report_data
from tdapp.attest.claims import (
    HARDWARE_TEES,
    TEE_KINDS,
    VM_TEES,
    Claims,
    EvidenceError,
    Tee,
)
from tdapp.attest.policy import (
    AllOf,
    AnyOf,
    ClaimsMatch,
    DebugTolerated,
    Failure,
    LoggedWorkloadIs,
    MeasurementIn,
    PlatformIn,
    Policy,
    ReportDataIs,
    SgxSignerIs,
    Success,
    TcbStatusTolerated,
    TeeIn,
    UnsafeNoOp,
    Verdict,
    WorkloadIn,
    WorkloadIsMeasured,
)
from tdapp.attest.verifiers import (
    EvidenceVerifier,
    SimVerifier,
    VerifierSettings,
    verifier_for,
)

__all__ = [
    "HARDWARE_TEES",
    "REPORT_DATA_SIZE",
    "TEE_KINDS",
    "VM_TEES",
    "AllOf",
    "AnyOf",
    "Claims",
    "ClaimsMatch",
    "DebugTolerated",
    "EvidenceError",
    "EvidenceVerifier",
    "Failure",
    "LoggedWorkloadIs",
    "MeasurementIn",
    "PlatformIn",
    "Policy",
    "ReportDataIs",
    "SgxSignerIs",
    "SimVerifier",
    "Success",
    "TcbStatusTolerated",
    "Tee",
    "TeeIn",
    "UnsafeNoOp",
    "Verdict",
    "VerifierSettings",
    "Workload",
    "WorkloadIn",
    "WorkloadIsMeasured",
    "report_data",
    "verifier_for",
]

"""What verified evidence says: :class:`Claims`, and :class:`EvidenceError` when it says nothing.

A verifier returns Claims only after checking the evidence's whole chain
(signature, key, platform); policies then judge the Claims. Claims must never
be built from evidence that was not verified: nothing here checks a signature.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType

from tdapp.attest.binding import REPORT_DATA_SIZE
from tdapp.errors import RefusedError


class Tee(StrEnum):
    """The kinds of evidence tdapp verifies."""

    SIM = "sim"  # signed by a LAS's platform key: no hardware behind it
    SGX = "sgx"  # Intel SGX DCAP quote of an enclave
    TDX = "tdx"  # Intel TDX DCAP quote of a trust domain
    SNP = "snp"  # AMD SEV-SNP attestation report of a VM

    @property
    def is_hardware(self) -> bool:
        match self:
            case Tee.SIM:
                return False
            case Tee.SGX | Tee.TDX | Tee.SNP:
                return True


TEE_KINDS = tuple(kind.value for kind in Tee)
HARDWARE_TEES = frozenset(kind for kind in Tee if kind.is_hardware)
# Confidential VMs: the hardware measures the VM, so the workload is bound in report_data.
VM_TEES = frozenset({Tee.TDX, Tee.SNP})


class EvidenceError(RefusedError):
    """The evidence is invalid (malformed, badly signed, unsupported); the message says why."""


@dataclass(frozen=True)
class Claims:
    """The verified content of one piece of evidence.

    ``measurement`` is lower-case hex (for ``sim`` and ``sgx`` the MRENCLAVE, for
    ``tdx`` MRTD, for ``snp`` MEASUREMENT); ``platform`` identifies the attesting
    platform (for ``sim``, the hex SHA-256 of the LAS's raw Ed25519 public key; for
    ``sgx``/``tdx`` the PPID; for ``snp`` the CHIP_ID); ``tcb_status`` uses
    Intel's names (``UpToDate``, ``SWHardeningNeeded``, …; ``UpToDate`` for
    ``sim`` and for ``snp``, whose TCB is checked against its VCEK instead).
    ``values`` holds the TEE's own named claims as the session language names
    them: sgx ``mrenclave``, ``mrsigner`` (hex), ``isvprodid``, ``isvsvn`` (int);
    tdx ``mrtd``, ``rtmr0``…``rtmr3``, ``mrconfigid`` (hex); snp ``measurement``,
    ``host_data`` (hex), ``policy`` (int), and others for display.
    """

    tee: Tee
    measurement: str
    report_data: bytes
    platform: str
    debug: bool
    tcb_status: str
    advisories: tuple[str, ...] = ()
    issued_at: float = 0.0
    values: Mapping[str, str | int] = field(default_factory=lambda: MappingProxyType({}))
    # tdx: the runtime event log, checked to replay to the quote's RTMR3 (eventlog.py).
    runtime_events: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "tee", Tee(self.tee))  # a verifier bug if not a known kind
        # A wrong size here is a verifier bug, not bad evidence: fail loudly.
        if len(self.report_data) != REPORT_DATA_SIZE:
            raise ValueError(f"report_data must be {REPORT_DATA_SIZE} bytes, "
                             f"got {len(self.report_data)}")


def base64_field(value: object, what: str, max_chars: int) -> bytes:
    """The bytes of a canonical base64 evidence field (one value, one encoding)."""
    if not isinstance(value, str):
        raise EvidenceError(f"{what} must be a base64 string")
    if len(value) > max_chars:
        raise EvidenceError(f"{what} is too long ({len(value)} characters, at most "
                            f"{max_chars})")
    try:
        raw = base64.b64decode(value.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error):
        raise EvidenceError(f"{what} is not valid base64") from None
    if base64.b64encode(raw).decode("ascii") != value:
        raise EvidenceError(f"{what} is not canonical base64 (padding or trailing bits)")
    return raw

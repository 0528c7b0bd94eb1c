"""What verified evidence says: :class:`Claims`, and :class:`EvidenceError` when it says nothing.

A verifier returns Claims only after checking the evidence's whole chain
(signature, key, platform); policies then judge the Claims. Claims must never
be built from evidence that was not verified: nothing here checks a signature.
"""

from __future__ import annotations

from dataclasses import dataclass

from tdapp.attest.binding import REPORT_DATA_SIZE
from tdapp.errors import RefusedError

TEE_KINDS = ("sim", "sgx", "tdx", "snp")


class EvidenceError(RefusedError):
    """The evidence is invalid (malformed, badly signed, unsupported); the message says why."""


@dataclass(frozen=True)
class Claims:
    """The verified content of one piece of evidence.

    ``measurement`` is lower-case hex (for ``sim`` and ``sgx`` the MRENCLAVE);
    ``platform`` identifies the attesting platform (for ``sim``, the hex SHA-256
    of the LAS's raw Ed25519 public key); ``tcb_status`` uses Intel's names
    (``UpToDate``, ``SWHardeningNeeded``, …; always ``UpToDate`` for ``sim``).
    """

    tee: str
    measurement: str
    report_data: bytes
    platform: str
    debug: bool
    tcb_status: str
    advisories: tuple[str, ...] = ()
    issued_at: float = 0.0

    def __post_init__(self) -> None:
        # A wrong size here is a verifier bug, not bad evidence: fail loudly.
        if len(self.report_data) != REPORT_DATA_SIZE:
            raise ValueError(f"report_data must be {REPORT_DATA_SIZE} bytes, "
                             f"got {len(self.report_data)}")

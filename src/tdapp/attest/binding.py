"""The binding of a run's nonce, ephemeral public key and workload into attestation evidence.

The runtime puts ``report_data(nonce, key, workload)`` into its evidence; the
CAS recomputes it from the nonce it issued, the key the runtime presents and
the workload the runtime names, and releases secrets only to that key, for
that workload. In a confidential VM the hardware measures the VM, not the
DApp: this binding is what tells the CAS which program, for which session and
service, asks. Owns this one derivation: it must never change without a new
``version``, since both sides must compute the same 64 bytes
(docs/attestation.md, "The binding", has a test vector).
"""

from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import dataclass

from tdapp.core.canonical import canonical_json
from tdapp.errors import InputError

REPORT_DATA_SIZE = 64
BINDING_VERSION = 2
_MEASUREMENT = re.compile(r"[0-9a-f]{64}")


def is_measurement(value: str) -> bool:
    """A tdapp image measurement in its one spelling: 64 lower-case hex characters."""
    return _MEASUREMENT.fullmatch(value) is not None


@dataclass(frozen=True)
class Workload:
    """What is about to run: the tdapp image's measurement, for a session's service."""

    measurement: str
    session: str
    service: str

    def __post_init__(self) -> None:
        if not is_measurement(self.measurement):
            raise InputError("a workload measurement is 64 lower-case hex characters")
        for name in ("session", "service"):
            if not getattr(self, name):
                raise InputError(f"a workload names its {name}")


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def report_data(nonce: str, public_key_der: bytes, workload: Workload) -> bytes:
    """SHA-512 of the canonical JSON of the binding (version 2)::

        {"version": 2, "nonce": …, "pubkey": base64url(DER SPKI),
         "workload": {"measurement": hex64, "session": …, "service": …}}

    ``public_key_der`` is the ephemeral key's DER SubjectPublicKeyInfo. The
    JSON is canonical (sorted keys, no spaces, UTF-8) so any implementation
    gets the same bytes; a JSON object rather than plain concatenation so that
    no two bindings can collide.
    """
    if not nonce.isascii():
        raise InputError("a nonce is ASCII; this one is not")
    document = {"version": BINDING_VERSION, "nonce": nonce, "pubkey": _b64url(public_key_der),
                "workload": {"measurement": workload.measurement,
                             "session": workload.session, "service": workload.service}}
    return hashlib.sha512(canonical_json(document)).digest()

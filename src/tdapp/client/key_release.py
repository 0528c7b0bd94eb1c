"""The runtime's side of attestation: nonce, evidence, key release, tag reports.

Owns the ephemeral key of one run: it is made here, bound into the evidence
through report_data, and used only to open the CAS's encrypted answer. Must
never write that key anywhere or send the released configuration on.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlencode

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jwcrypto import jwe, jwk
from jwcrypto.common import JWException

from tdapp.attest import Workload, report_data
from tdapp.attest.release import ReleasedConfiguration
from tdapp.client.cas_client import CasClient
from tdapp.errors import IntegrityError, NotFoundError

EvidenceSource = Callable[[bytes, str], Mapping[str, Any]]
"""(report_data, the session's attestation mode as the CAS states it) -> evidence."""


class EphemeralKey:
    """An EC P-256 key pair that lives in this process's memory for one run."""

    def __init__(self) -> None:
        self._key = ec.generate_private_key(ec.SECP256R1())

    @property
    def public_der(self) -> bytes:
        return self._key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)

    @property
    def public_b64url(self) -> str:
        return base64.urlsafe_b64encode(self.public_der).rstrip(b"=").decode()

    def open(self, compact_jwe: str) -> ReleasedConfiguration:
        token = jwe.JWE()
        try:
            token.deserialize(compact_jwe, key=jwk.JWK.from_pyca(self._key))
        except (JWException, ValueError) as error:
            raise IntegrityError(f"the CAS's answer could not be decrypted: {error}") from None
        return ReleasedConfiguration.from_json(token.payload)


def obtain_configuration(cas: CasClient, workload: Workload,
                         evidence_for: EvidenceSource) -> ReleasedConfiguration:
    """Attest to the CAS for ``workload`` (the measured image, for a session's service)
    and get this run's configuration, readable only by this process."""
    session, service = workload.session, workload.service
    issued = cas.request_json("POST", "/v1/attestation/nonce",
                              {"session": session, "service": service})
    nonce = str(issued["nonce"])
    key = EphemeralKey()
    evidence = evidence_for(report_data(nonce, key.public_der, workload),
                            str(issued.get("mode", "")))
    answer = cas.request_json("POST", "/v1/attestation", {
        "session": session, "service": service, "nonce": nonce,
        "public_key": key.public_b64url, "workload": workload.measurement,
        "evidence": dict(evidence)})
    released = key.open(str(answer["jwe"]))
    if (released.session, released.service) != (session, service):
        raise IntegrityError(f"the CAS released the configuration of {released.session}/"
                             f"{released.service}, not of {session}/{service}")
    if released.workload != workload.measurement:
        raise IntegrityError(f"the CAS released the configuration for workload "
                             f"{released.workload}, not for {workload.measurement}, the "
                             "image this runtime measured; running nothing")
    return released


def commit_run(cas: CasClient, token: str, session: str,
               moves: Mapping[str, tuple[str | None, str]], bundle_sha256: str | None, *,
               label: str | None = None, url: str | None = None) -> str:
    """Move every output tag of the run at once (compare-and-swap each, all or none) and
    get the run's receipt, a compact JWS the CAS signed."""
    answer = cas.request_json("POST", "/v1/runs/commit", {
        "session": session, "bundle_sha256": bundle_sha256, "label": label, "url": url,
        "moves": [{"volume": volume, "old": old, "new": new}
                  for volume, (old, new) in sorted(moves.items())]}, bearer=token)
    receipt = answer.get("receipt")
    if not isinstance(receipt, str):
        raise IntegrityError("the CAS committed the run but sent no receipt")
    return receipt


def committed_run(cas: CasClient, token: str, session: str,
                  label: str) -> tuple[str, str | None] | None:
    """(receipt, url) of a run of ``session`` labelled ``label`` that committed already."""
    try:
        answer = cas.request("GET", f"/v1/runs?{urlencode({'session': session, 'label': label})}",
                             bearer=token)
    except NotFoundError:
        return None
    receipt, url = answer.get("receipt"), answer.get("url")
    if not isinstance(receipt, str):
        raise IntegrityError("the CAS found the earlier run but sent no receipt")
    return receipt, url if isinstance(url, str) else None


def report_tag(cas: CasClient, token: str, session: str, volume: str, old: str | None,
               new: str) -> None:
    """Tell the CAS a volume's new tag; refused unless ``old`` is still current."""
    cas.request_json("PUT", "/v1/volume-tags",
                     {"session": session, "volume": volume, "old": old, "new": new},
                     bearer=token)

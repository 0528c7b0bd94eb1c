"""The CAS's trust decisions about programs: nonces, attestation, key release, tag updates.

:class:`AttestationAuthority` owns the invariant that a session's keys and
configuration leave the CAS only encrypted to the ephemeral key of a program
whose evidence verified, whose nonce was fresh and unused, whose report_data
binds that nonce and key, and whose measurement, platform, TEE and TCB the
session accepts; and that a volume's tag moves only on the word of such an
instance, by compare-and-swap. Every step's outcome goes to the audit log.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_der_public_key
from jwcrypto import jwe, jwk

from tdapp.attest import (
    AllOf,
    Claims,
    DebugTolerated,
    EvidenceError,
    MeasurementIn,
    PlatformIn,
    Policy,
    ReportDataIs,
    TcbStatusTolerated,
    TeeIn,
    report_data,
    verifier_for,
)
from tdapp.cas.sessions import NotFoundError, SessionAuthority
from tdapp.cas.store import Store
from tdapp.errors import ConflictError, InputError, RefusedError, TdappError
from tdapp.policy import Service, Session

NONCE_LIFETIME = 120.0
INSTANCE_LIFETIME = 24 * 3600.0
HARDWARE_TEES = ("sgx", "tdx", "snp")


@dataclass(frozen=True)
class AttestationRequest:
    session: str
    service: str
    nonce: str
    public_key: str  # base64url DER SubjectPublicKeyInfo of the runtime's ephemeral key
    evidence: Mapping[str, Any] | None

    @classmethod
    def from_json(cls, body: Any) -> AttestationRequest:
        if not isinstance(body, dict):
            raise InputError("the attestation request must be a JSON object")
        fields = {}
        for name in ("session", "service", "nonce", "public_key"):
            value = body.get(name)
            if not isinstance(value, str) or not value:
                raise InputError(f"the attestation request needs a string {name!r}")
            fields[name] = value
        evidence = body.get("evidence")
        if evidence is not None and not isinstance(evidence, dict):
            raise InputError("'evidence' must be a JSON object")
        return cls(evidence=evidence, **fields)


class AttestationAuthority:
    def __init__(self, store: Store, sessions: SessionAuthority, *, debug: bool) -> None:
        self._store = store
        self._sessions = sessions
        self._debug = debug

    # -- nonces -------------------------------------------------------------------

    def issue_nonce(self, session_name: str, service_name: str) -> tuple[str, float]:
        self._service(session_name, service_name, "attest.nonce")
        nonce = secrets.token_hex(32)
        expires_at = time.time() + NONCE_LIFETIME
        self._store.add_nonce(nonce, session_name, service_name, expires_at)
        return nonce, expires_at

    # -- attestation ----------------------------------------------------------------

    def attest(self, request: AttestationRequest) -> tuple[str, str]:
        """Check everything; return (compact JWE of the configuration, instance token hash)."""
        event = "attest"
        session, service = self._service(request.session, request.service, event)
        self._consume(request, event)
        public_key = self._public_key(request, event)
        mode = self.mode_of(session)
        measurement = "none"
        if mode != "none":
            claims = self._verified_claims(request, event)
            verdict = self.policy_for(session, service, mode, request.nonce,
                                      _der(public_key)).verify(claims)
            if not verdict.ok:
                self._refuse(request.session, event, RefusedError(verdict.reason))
            measurement = claims.measurement
        volumes = self._volumes(session, service, request.session, event)
        token = secrets.token_hex(32)
        token_hash = _token_hash(token)
        expires_at = time.time() + INSTANCE_LIFETIME
        configuration = {
            "session": session.name, "service": service.name, "mode": mode,
            "command": service.argv(), "environment": dict(service.environment),
            "pwd": service.pwd or "/", "volumes": volumes,
            "injection_files": self._injection_files(session, service),
            "token": token, "expires_at": expires_at,
        }
        self._store.add_instance(token_hash, session.name, service.name, measurement, expires_at,
                                 (event, None, f"accepted {mode} attestation of {service.name} "
                                               f"(measurement {measurement}); instance "
                                               f"{token_hash[:16]}"))
        return _encrypt_to(public_key, configuration), token_hash

    def mode_of(self, session: Session) -> str:
        if session.security.delegate is not None:
            raise RefusedError("the session's security section is a placeholder; tdapp cannot "
                               "attest against it")
        mode = session.security.attestation.mode
        if mode is None:
            return "sim" if self._debug else "hardware"
        return str(mode)

    @staticmethod
    def policy_for(session: Session, service: Service, mode: str, nonce: str,
                   public_key_der: bytes) -> Policy:
        attestation = session.security.attestation
        measurements = {m for variant in service.attestation_variants() for m in variant.mrenclave}
        parts: list[Policy] = [
            TeeIn(HARDWARE_TEES if mode == "hardware" else ("sim", *HARDWARE_TEES), mode=mode),
            ReportDataIs(report_data(nonce, public_key_der)),
            MeasurementIn(measurements),
            DebugTolerated("debug-mode" in attestation.tolerate),
            TcbStatusTolerated(attestation.tolerate, _advisories(attestation.ignore_advisories)),
        ]
        if attestation.platforms:
            parts.append(PlatformIn(attestation.platforms))
        return AllOf(parts)

    # -- volume tags ----------------------------------------------------------------

    def update_tag(self, token: str, session_name: str, volume: str, old: str | None,
                   new: str) -> None:
        event = "volume.tag"
        instance = self._store.instance(_token_hash(token))
        if instance is None:
            self._refuse(session_name, event, RefusedError(
                "the token is not one of an attested instance"))
        owner_session, _service, expires_at = instance
        if owner_session != session_name:
            self._refuse(session_name, event, RefusedError(
                f"the token belongs to an instance of another session, not {session_name!r}"))
        if expires_at < time.time():
            self._refuse(session_name, event, RefusedError("the instance's token has expired"))
        if len(new) != 32 or not _is_hex(new):
            self._refuse(session_name, event, InputError("the new tag must be 32 hex characters"))
        known, current = self._store.volume_tag(session_name, volume)
        if not known:
            self._refuse(session_name, event, NotFoundError(
                f"session {session_name!r} has no volume {volume!r}"))
        if not self._store.swap_volume_tag(
                session_name, volume, old, new,
                (event, None, f"{volume}: {old} -> {new}")):
            self._refuse(session_name, event, ConflictError(
                f"volume {volume!r}: the old tag {old} is no longer current (now {current}); "
                "another run has changed the volume"))

    # -- helpers ----------------------------------------------------------------------

    def _service(self, session_name: str, service_name: str,
                 event: str) -> tuple[Session, Service]:
        session = self._sessions.stored(session_name)
        if session is None:
            self._refuse(session_name, event, NotFoundError(f"no session named {session_name!r}"))
        service = session.service(service_name)
        if service is None:
            self._refuse(session_name, event, NotFoundError(
                f"session {session_name!r} has no service {service_name!r}"))
        return session, service

    def _consume(self, request: AttestationRequest, event: str) -> None:
        use = self._store.consume_nonce(request.nonce)
        if not use.known:
            self._refuse(request.session, event, RefusedError("unknown nonce"))
        if not use.first_use:
            self._refuse(request.session, event, RefusedError("nonce already used (replay)"))
        if use.expires_at < time.time():
            self._refuse(request.session, event, RefusedError("nonce expired"))
        if (use.session, use.service) != (request.session, request.service):
            self._refuse(request.session, event, RefusedError(
                f"nonce was issued for {use.session}/{use.service}"))

    def _public_key(self, request: AttestationRequest, event: str) -> ec.EllipticCurvePublicKey:
        try:
            key = load_der_public_key(_b64url_decode(request.public_key))
        except (ValueError, binascii.Error):
            self._refuse(request.session, event, InputError(
                "public_key is not a base64url DER public key"))
        if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
            self._refuse(request.session, event, InputError("public_key must be an EC P-256 key"))
        return key

    def _verified_claims(self, request: AttestationRequest, event: str) -> Claims:
        if request.evidence is None:
            self._refuse(request.session, event, RefusedError(
                "evidence is required for this session"))
        try:
            return verifier_for(request.evidence).verify(request.evidence, at=time.time())
        except EvidenceError as error:
            self._refuse(request.session, event, error)

    def _volumes(self, session: Session, service: Service, name: str,
                 event: str) -> list[dict[str, Any]]:
        image = session.image(service.image_name) if service.image_name else None
        result = []
        for mount in image.volumes if image is not None else ():
            volume = session.volume(mount.name)
            known, tag = self._store.volume_tag(name, mount.name)
            if volume is None or not known:
                self._refuse(name, event, RefusedError(
                    f"the expected tag of volume {mount.name!r} is not known"))
            result.append({"name": mount.name, "path": mount.path, "key": volume.fspf_key,
                           "tag": tag})
        return result

    @staticmethod
    def _injection_files(session: Session, service: Service) -> list[dict[str, Any]]:
        image = session.image(service.image_name) if service.image_name else None
        if image is None:
            return []
        return [{"path": f.path, "content": f.content, "permission": f.permission}
                for f in image.injection_files]

    def _refuse(self, session: str | None, event: str, error: TdappError) -> NoReturn:
        self._store.record(session, event, None, "refused", error.message)
        raise error


def _advisories(value: object) -> Any:
    return "*" if value == "*" or (isinstance(value, tuple) and "*" in value) else tuple(
        value if isinstance(value, tuple) else ())


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdef" for c in text)


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _der(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.DER,
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def _encrypt_to(key: ec.EllipticCurvePublicKey, configuration: Mapping[str, Any]) -> str:
    """JWE (ECDH-ES + A256GCM) to the runtime's ephemeral key; only it can read the answer."""
    token = jwe.JWE(json.dumps(configuration).encode("utf-8"),
                    protected=json.dumps({"alg": "ECDH-ES", "enc": "A256GCM",
                                          "cty": "tdapp-config+json"}))
    token.add_recipient(jwk.JWK.from_pyca(key))
    return str(token.serialize(compact=True))

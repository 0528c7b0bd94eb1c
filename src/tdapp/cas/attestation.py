"""The CAS's trust decisions about programs: nonces, attestation, key release, tag updates.

:class:`AttestationAuthority` owns the invariant that a session's keys and
configuration leave the CAS only encrypted to the ephemeral key of a program
whose evidence verified, whose nonce was fresh and unused, whose report_data
binds that nonce and key, and whose measurement, platform, TEE and TCB the
session accepts, in the mode the session fixed when it was stored
(``hardware``: hardware evidence only; ``sim``: also LAS-signed evidence, and
only from the platforms the session names; ``none``:
:class:`~tdapp.attest.UnsafeNoOp`); and that a volume's tag moves only on the
word of such an instance, for a volume its own service's image mounts, by
compare-and-swap from the current tag to the next version. Instance and tag
rows are sealed and checked by :class:`~tdapp.cas.records.RecordMacs`: a row
the CAS did not write releases nothing and moves nothing. Every step's outcome
goes to the audit log with its full reason; a caller who is not a reader of the
session is told only which check failed and what of its own evidence was
refused, never what the session expects.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn, assert_never

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_der_public_key
from pydantic import SecretBytes, SecretStr

from tdapp.attest import (
    Claims,
    UnsafeNoOp,
    VerifierSettings,
    Workload,
    verifier_for,
)
from tdapp.attest.binding import is_measurement
from tdapp.attest.release import (
    MEDIA_TYPE,
    IexecGrant,
    InjectedFile,
    ReleasedConfiguration,
    VolumeGrant,
)
from tdapp.cas.judging import CheckFailed, checks_for, public_reason
from tdapp.cas.nonces import NonceMinter
from tdapp.cas.receipts import ReceiptSigner
from tdapp.cas.release_jwe import encrypt_to
from tdapp.cas.sessions import OpenedSession, SessionAuthority
from tdapp.cas.sharing import Grants, ImportRefused, Sharing
from tdapp.cas.store import AuditEntry, NewInstance, Outcome, SpentNonce, Store, StoredTag
from tdapp.cas.tags import TagAuthority
from tdapp.core.canonical import canonical_json
from tdapp.errors import (
    InputError,
    NotFoundError,
    RefusedError,
    TdappError,
)
from tdapp.policy import Identity, Service, Session
from tdapp.policy.iexec_task import iexec_task_of
from tdapp.policy.modes import LEGACY_MODE
from tdapp.policy.security import AttestationMode
from tdapp.volume import VolumeKey, VolumeTag

INSTANCE_LIFETIME = 24 * 3600.0


@dataclass(frozen=True)
class AttestationRequest:
    session: str
    service: str
    nonce: str
    public_key: str  # base64url DER SubjectPublicKeyInfo of the runtime's ephemeral key
    workload: str  # the measurement of the image the runtime is about to run (hex64)
    evidence: Mapping[str, Any] | None

    @classmethod
    def from_json(cls, body: Any) -> AttestationRequest:
        if not isinstance(body, dict):
            raise InputError("the attestation request must be a JSON object")
        fields = {}
        for name in ("session", "service", "nonce", "public_key", "workload"):
            value = body.get(name)
            if not isinstance(value, str) or not value:
                raise InputError(f"the attestation request needs a string {name!r}")
            fields[name] = value
        if not is_measurement(fields["workload"]):
            raise InputError("'workload' must be the image's measurement: 64 lower-case hex "
                             "characters")
        evidence = body.get("evidence")
        if evidence is not None and not isinstance(evidence, dict):
            raise InputError("'evidence' must be a JSON object")
        return cls(evidence=evidence, **fields)


class AttestationAuthority:
    def __init__(self, store: Store, sessions: SessionAuthority, nonces: NonceMinter, *,
                 verifiers: VerifierSettings | None = None,
                 verify_at: float | None = None,
                 receipts: ReceiptSigner | None = None) -> None:
        self._store = store
        self._sessions = sessions
        self._records = sessions.records
        self._nonces = nonces
        self._sharing = Sharing(store, sessions)
        self.tags = TagAuthority(store, sessions, receipts)
        self._verifiers = verifiers or VerifierSettings()
        # Fixed only to replay recorded evidence whose collateral has since expired.
        self._verify_at = verify_at

    # -- nonces -------------------------------------------------------------------

    def issue_nonce(self, session_name: str, service_name: str) -> tuple[str, float, str]:
        """A fresh nonce, its expiry, and the session's attestation mode (so that a
        runtime without a TEE knows before it tries whether simulation will do)."""
        session = self._sessions.recently_stored(session_name)
        if session is None or session.service(service_name) is None:
            # Maybe created or extended on another replica since: ask the database.
            session, _ = self._service(session_name, service_name, "attest.nonce")
        return self._nonce_for(session, session_name, service_name)

    def issue_nonce_from_memory(self, session_name: str,
                                service_name: str) -> tuple[str, float, str] | None:
        """:meth:`issue_nonce` for a session and service this CAS verified lately, without
        touching the database (so cheap enough for the event loop); None otherwise."""
        session = self._sessions.recently_verified(session_name)
        if session is None or session.service(service_name) is None:
            return None
        return self._nonce_for(session, session_name, service_name)

    def _nonce_for(self, session: Session, session_name: str,
                   service_name: str) -> tuple[str, float, str]:
        nonce, expires_at = self._nonces.issue(session_name, service_name)
        try:
            mode = str(self.mode_of(session))
        except RefusedError:
            mode = "unsupported"
        return nonce, expires_at, mode

    # -- attestation ----------------------------------------------------------------

    def attest(self, request: AttestationRequest, *,
               caller: Identity | None = None) -> tuple[str, str]:
        """Check everything; return (compact JWE of the configuration, instance token hash).

        ``caller`` is the client identity of the request (None: anonymous). Only a
        reader of the session is told a refusal's full reason; it is always in the
        audit log.
        """
        event = "attest"
        opened, service, tags = self._opened(request.session, request.service, event)
        session = opened.session
        nonce = self._spendable(request, event)
        steps: list[AuditEntry] = []  # what passed, for the audit log
        grants = Grants()
        token = secrets.token_hex(32)
        token_hash = _token_hash(token)
        expires_at = time.time() + INSTANCE_LIFETIME
        try:
            public_key = self._public_key(request)
            mode = self.mode_of(session)
            judged = self._judge(request, session, service, mode, public_key, steps)
            volumes = self._volumes(opened, service, grants, tags)
            fill, fill_file = self._sharing.fillers(opened, grants)
            configuration = ReleasedConfiguration(
                session=session.name, service=service.name, mode=mode,
                workload=request.workload, command=tuple(service.argv()),
                # `NAME:` with no value is the empty string, as in a shell's `NAME=`.
                environment={name: fill(value or "")
                             for name, value in service.environment.items()},
                pwd=fill(service.pwd or "/"), volumes=tuple(volumes),
                injection_files=self._injection_files(session, service, fill_file),
                token=SecretStr(token), expires_at=expires_at,
                iexec=self._iexec(session, service))
        except TdappError as error:
            # A refused attempt spends its nonce: evidence is never judged twice.
            refused = AuditEntry(event, Outcome.REFUSED, error.message)
            self._store.spend_nonce(nonce, [*steps, *grants.steps, refused])
            if isinstance(error, CheckFailed) and not self._sessions.may_read(
                    request.session, caller):
                raise RefusedError(error.public) from None
            if isinstance(error, ImportRefused) and not self._sessions.may_read(
                    request.session, caller):
                raise RefusedError(ImportRefused.public) from None
            if isinstance(error, UnknownTag) and not self._sessions.may_read(
                    request.session, caller):
                raise RefusedError("the session is not ready: the tag of a volume this "
                                   "service mounts is not known") from None
            raise
        accepted = AuditEntry(event, Outcome.ACCEPTED,
                              f"accepted {mode} attestation of {service.name} (measurement "
                              f"{judged.measurement}); instance {token_hash[:16]}")
        # What this instance's receipt will state, MAC'd with its row.
        details = canonical_json({
            "session_hash": opened.hash, "mode": str(mode), "tee": judged.tee,
            "platform": judged.platform, "evidence_sha256": judged.evidence_sha256,
            "inputs": {grant.name: None if grant.tag is None else grant.tag.hex()
                       for grant in volumes}}).decode("utf-8")
        instance = NewInstance(token_hash, judged.measurement, expires_at,
                               self._records.instance_mac(token_hash, session.name, service.name,
                                                          judged.measurement, expires_at,
                                                          details), details)
        exporters = [(exporter, AuditEntry(entry.event, entry.outcome,
                                           f"{entry.reason} (instance {token_hash[:16]})"))
                     for exporter, entry in grants.exporter_audits]
        # One transaction: the nonce spent, the instance, this log and the exporters'.
        if not self._store.spend_nonce(nonce, [*steps, *grants.steps, accepted], instance,
                                       exporters):
            self._refuse(request.session, event, RefusedError("nonce already used (replay)"))
        return _encrypt_to(public_key, configuration), token_hash

    def _judge(self, request: AttestationRequest, session: Session, service: Service,
               mode: AttestationMode, public_key: ec.EllipticCurvePublicKey,
               steps: list[AuditEntry]) -> Judged:
        """Judge the request in the session's mode; what passed (each check that passed is
        appended to ``steps``), or CheckFailed."""
        match mode:
            case AttestationMode.NONE:
                UnsafeNoOp().verify(None)
                steps.append(AuditEntry("attest.none", Outcome.ACCEPTED,
                                        "mode none: no attestation (UnsafeNoOp)"))
                return Judged("none", "none", "none", None)
            case AttestationMode.HARDWARE | AttestationMode.SIM:
                claims = self._verified_claims(request)
                steps.append(AuditEntry("attest.evidence", Outcome.ACCEPTED, _describe(claims)))
                workload = Workload(request.workload, session.name, service.name)
                for label, policy in checks_for(session, service, mode, request.nonce,
                                                _der(public_key), workload, claims.tee,
                                                runtime_events=bool(claims.runtime_events)):
                    verdict = policy.verify(claims)
                    if not verdict.ok:
                        raise CheckFailed(label, verdict.reason, public_reason(
                            label, claims, verdict.reason, workload.measurement))
                    steps.append(AuditEntry(f"attest.{label}", Outcome.ACCEPTED, f"{label}: ok"))
                evidence = hashlib.sha256(canonical_json(request.evidence)).hexdigest()
                return Judged(claims.measurement, str(claims.tee), claims.platform, evidence)
            case AttestationMode.MAA:
                raise RefusedError("mode maa cannot be enforced by tdapp (no Azure "
                                   "Attestation verifier)")
            case unreachable:
                assert_never(unreachable)

    @staticmethod
    def mode_of(session: Session) -> AttestationMode:
        """The mode the session was stored with (fixed at creation, whatever the CAS's
        flags are now; a session stored before modes were fixed is ``hardware``)."""
        if session.security.delegate is not None:
            raise RefusedError("the session's security section is a placeholder; tdapp cannot "
                               "attest against it")
        return session.security.attestation.mode or LEGACY_MODE

    # -- volume tags ----------------------------------------------------------------

    def update_tag(self, token: str, session_name: str, volume: str, old: str | None,
                   new: str) -> None:
        """Move a volume's tag from ``old`` to ``new`` on the word of an attested instance
        (:class:`tdapp.cas.tags.TagAuthority` decides)."""
        self.tags.update_tag(token, session_name, volume, old, new)

    # -- helpers ----------------------------------------------------------------------

    def _opened(self, session_name: str, service_name: str,
                event: str) -> tuple[OpenedSession, Service, dict[str, StoredTag]]:
        opened, tags = self._sessions.opened_with_tags(session_name)
        if opened is None:
            self._refuse(session_name, event, NotFoundError(f"no session named {session_name!r}"))
        service = opened.session.service(service_name)
        if service is None:
            self._refuse(session_name, event, NotFoundError(
                f"session {session_name!r} has no service {service_name!r}"))
        return opened, service, tags

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

    def _spendable(self, request: AttestationRequest, event: str) -> SpentNonce:
        """The request's nonce if this CAS issued it for this service and it is fresh."""
        try:
            checked = self._nonces.check(request.nonce, request.session, request.service)
        except RefusedError as error:
            self._refuse(request.session, event, error)
        # Whether it was spent already is settled where it is spent, atomically.
        return SpentNonce(checked.digest, request.session, request.service, checked.expires_at)

    @staticmethod
    def _public_key(request: AttestationRequest) -> ec.EllipticCurvePublicKey:
        try:
            key = load_der_public_key(_b64url_decode(request.public_key))
        except (ValueError, binascii.Error):
            raise InputError("public_key is not a base64url DER public key") from None
        if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
            raise InputError("public_key must be an EC P-256 key")
        return key

    def _verified_claims(self, request: AttestationRequest) -> Claims:
        if request.evidence is None:
            raise RefusedError("evidence is required for this session")
        at = self._verify_at if self._verify_at is not None else time.time()
        return verifier_for(request.evidence, self._verifiers).verify(request.evidence, at=at)

    def _volumes(self, opened: OpenedSession, service: Service, grants: Grants,
                 tags: dict[str, StoredTag]) -> list[VolumeGrant]:
        """What the service's image mounts; ``tags`` are the session's rows, read with it."""
        session = opened.session
        image = session.image(service.image_name) if service.image_name else None
        result = []
        for mount in image.volumes if image is not None else ():
            volume = session.volume(mount.name)
            if volume is not None and volume.import_ is not None:
                shared = self._sharing.volume(opened, volume, grants)
                result.append(VolumeGrant(
                    name=mount.name, path=mount.path, key=VolumeKey.from_hex(shared.key),
                    tag=None if shared.tag.tag is None else VolumeTag.from_hex(shared.tag.tag),
                    writable=False))
                continue
            row = tags.get(mount.name)
            if volume is None or row is None:
                raise UnknownTag(f"the expected tag of volume {mount.name!r} is not known")
            if volume.fspf_key is None:
                raise UnknownTag(f"volume {mount.name!r} has no key yet")
            # A row the CAS did not write (IntegrityError) releases nothing.
            tag = self._records.check_tag(row).tag
            result.append(VolumeGrant(name=mount.name, path=mount.path,
                                      key=VolumeKey.from_hex(volume.fspf_key),
                                      tag=None if tag is None else VolumeTag.from_hex(tag)))
        return result

    def _iexec(self, session: Session, service: Service) -> IexecGrant | None:
        """For an iExec task: its challenge key, for the runtime to sign the result with."""
        task = iexec_task_of(session, service)
        if task is None:
            return None
        challenge = self._sessions.challenges.for_task(session.name, task.task_id)
        return IexecGrant(task_id=task.task_id, output=task.out,
                          challenge=SecretStr(challenge.private_key_hex()))

    @staticmethod
    def _injection_files(session: Session, service: Service,
                         fill: Callable[[str], bytes]) -> tuple[InjectedFile, ...]:
        image = session.image(service.image_name) if service.image_name else None
        if image is None:
            return ()
        return tuple(InjectedFile(path=f.path, content=SecretBytes(fill(f.content or "")),
                                  permission=f.permission) for f in image.injection_files)

    def _refuse(self, session: str | None, event: str, error: TdappError) -> NoReturn:
        self._store.record(session, event, None, Outcome.REFUSED, error.message)
        raise error


@dataclass(frozen=True)
class Judged:
    """What the evidence showed, as the instance's receipt will state it."""

    measurement: str
    tee: str
    platform: str
    evidence_sha256: str | None


class UnknownTag(RefusedError):
    """A volume the service mounts has no known tag yet."""


def _describe(claims: Claims) -> str:
    """The verified evidence in one audit line (no secrets: claims are public values)."""
    parts = [f"{claims.tee} evidence verified", f"measurement {claims.measurement}",
             f"TCB {claims.tcb_status}"]
    if claims.advisories:
        parts.append(f"advisories {', '.join(claims.advisories)}")
    if claims.debug:
        parts.append("debug")
    parts.append(f"platform {claims.platform[:32]}")
    return "; ".join(parts)


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _der(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.DER,
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def _encrypt_to(key: ec.EllipticCurvePublicKey, configuration: ReleasedConfiguration) -> str:
    """JWE (ECDH-ES + A256GCM) to the runtime's ephemeral key; only it can read the answer."""
    return encrypt_to(key, configuration.to_json(), MEDIA_TYPE)

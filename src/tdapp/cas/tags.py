"""The CAS's trust decisions about moving volume tags, and the receipts of runs.

:class:`TagAuthority` owns the invariant that a volume's tag moves only on the
word of an attested instance (its token, a row the CAS wrote and sealed, not
expired), of the session it belongs to, for a volume its own service's image
mounts and does not import, by compare-and-swap from the current tag to the
next version. :meth:`TagAuthority.commit_run` moves all of a run's outputs in
one transaction (none moves unless all can) and, in the same transaction,
keeps the run's :class:`~tdapp.attest.receipt.Receipt`, signed by the CAS's
receipt key: what was released at attestation (recorded, MAC'd, in the
instance row), the tags old → new, and the digest of the uploaded bundle. An
instance commits once. The one other way a tag moves is
:meth:`TagAuthority.replace_volumes`: an identity that ``access_policy.update``
allows replaces the session's own (not imported) volumes with new ones it
encrypted, again by compare-and-swap from the current tags, all or none, so
new inputs can be pushed into a session and an older bundle of them is refused
from then on. Every decision goes to the audit log.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NoReturn

from tdapp.attest.receipt import OutputMove, Receipt
from tdapp.cas.receipts import ReceiptSigner
from tdapp.cas.sessions import SessionAuthority
from tdapp.cas.store import AuditEntry, Outcome, Store, StoredInstance, StoredTag, TagSwap
from tdapp.errors import (
    ConflictError,
    InputError,
    IntegrityError,
    NotFoundError,
    RefusedError,
    TdappError,
    UnavailableError,
)
from tdapp.policy import Identity

_HEX = frozenset("0123456789abcdef")
_LABEL = re.compile(r"[A-Za-z0-9_.:-]{1,128}")


@dataclass(frozen=True)
class Move:
    """One output volume's tag change, as the runtime reports it."""

    volume: str
    old: str | None
    new: str


class TagAuthority:
    def __init__(self, store: Store, sessions: SessionAuthority,
                 signer: ReceiptSigner | None = None) -> None:
        self._store = store
        self._sessions = sessions
        self._records = sessions.records
        self._signer = signer

    def update_tag(self, token: str, session_name: str, volume: str, old: str | None,
                   new: str) -> None:
        """Move one volume's tag (SCONE's per-volume report; no receipt)."""
        event = "volume.tag"
        instance = self._instance(token, session_name, event)
        swap = self._swap(instance, Move(volume, old, new), event)
        if not self._store.swap_volume_tag(swap.current, swap.new, (
                event, None, _moved(swap, instance))):
            latest = self._store.volume_tag(session_name, volume)
            self._refuse(session_name, event,
                         _stale(volume, old, latest.tag if latest is not None else None))

    def commit_run(self, token: str, session_name: str, moves: Sequence[Move],
                   bundle_sha256: str | None, *, label: str | None = None,
                   url: str | None = None) -> str:
        """Move every output tag of the run at once and return its signed receipt.

        ``label`` (a pool task's id) is stated in the receipt; with ``url`` it lets a
        redelivered task find this run (:meth:`labelled_run`).
        """
        event = "run.commit"
        if self._signer is None:
            self._refuse(session_name, event, UnavailableError("this CAS signs no receipts"))
        instance = self._instance(token, session_name, event)
        if instance.details is None:
            self._refuse(session_name, event, RefusedError(
                "the instance was attested before receipts were kept: report its tags one "
                "by one (PUT /v1/volume-tags)"))
        if len({move.volume for move in moves}) != len(moves):
            self._refuse(session_name, event, InputError("a volume is moved twice in one run"))
        if bundle_sha256 is not None and (len(bundle_sha256) != 64
                                          or not set(bundle_sha256) <= _HEX):
            self._refuse(session_name, event, InputError(
                "bundle_sha256 must be 64 lower-case hex characters"))
        if label is not None and not _LABEL.fullmatch(label):
            self._refuse(session_name, event, InputError(
                "label must be 1 to 128 characters from A-Z a-z 0-9 _ . : -"))
        if url is not None and len(url) > 2048:
            self._refuse(session_name, event, InputError("url is longer than 2048 characters"))
        swaps = [self._swap(instance, move, event) for move in moves]
        receipt = self._receipt(instance, swaps, bundle_sha256, label)
        signed = self._signer.sign(receipt)
        audits = [AuditEntry(event, Outcome.ACCEPTED, _moved(swap, instance)) for swap in swaps]
        audits.append(AuditEntry(event, Outcome.ACCEPTED, (
            f"receipt for instance {instance.token_hash[:16]}: {len(swaps)} output(s), bundle "
            f"{bundle_sha256 or 'none'}")))
        failed = self._store.commit_run(instance.token_hash, session_name, swaps, signed,
                                        bundle_sha256, audits, label=label, url=url)
        if failed == "committed":
            self._refuse(session_name, event, ConflictError(
                "this instance has committed its outputs already (one commit per run)"))
        if failed is not None:
            move = next(m for m in moves if m.volume == failed)
            latest = self._store.volume_tag(session_name, failed)
            self._refuse(session_name, event,
                         _stale(failed, move.old, latest.tag if latest is not None else None))
        return signed

    def replace_volumes(self, who: Identity | None, session_name: str,
                        moves: Sequence[Move]) -> None:
        """Move the tags of the session's own volumes to those of volumes its owner made.

        ``who`` must be allowed ``access_policy.update``; each volume must be one the
        session declares and does not import, each ``old`` its current tag.
        """
        event = "volume.replace"
        session, _, actor = self._sessions.changeable(session_name, who, event,
                                                      "replace the volumes of")
        if not moves or len({move.volume for move in moves}) != len(moves):
            self._refuse(session_name, event, InputError(
                "name each volume to replace once (at least one)"), actor)
        swaps = []
        for move in moves:
            declared = session.volume(move.volume)
            if declared is None:
                self._refuse(session_name, event, NotFoundError(
                    f"session {session_name!r} has no volume {move.volume!r}"), actor)
            if declared.import_ is not None:
                self._refuse(session_name, event, RefusedError(
                    f"volume {move.volume!r} is imported: only its exporting session's owner "
                    "replaces it"), actor)
            current = self._current(session_name, move, event, actor)
            swaps.append(TagSwap(current, self._records.next_tag(current, move.new)))
        audits = [AuditEntry(event, Outcome.ACCEPTED, (
            f"{swap.current.volume}: {swap.current.tag} -> {swap.new.tag} (version "
            f"{swap.new.version}) replaced by the owner")) for swap in swaps]
        failed = self._store.swap_volume_tags(session_name, swaps, audits, actor=actor)
        if failed is not None:
            move = next(m for m in moves if m.volume == failed)
            latest = self._store.volume_tag(session_name, failed)
            self._refuse(session_name, event,
                         _stale(failed, move.old, latest.tag if latest is not None else None),
                         actor)

    def labelled_run(self, token: str, session_name: str, label: str) -> tuple[str, str | None]:
        """(receipt, url) of a committed run of the session with ``label``, for an instance
        of that session (a redelivered pool task asks before running again)."""
        self._instance(token, session_name, "run.lookup")
        found = self._store.labelled_run(session_name, label)
        if found is None:
            raise NotFoundError(f"no committed run of session {session_name!r} is labelled "
                                f"{label!r}")
        return found

    def receipt_for(self, session_name: str, bundle_sha256: str) -> str:
        found = self._store.receipt_for(session_name, bundle_sha256)
        if found is None:
            raise NotFoundError(f"no receipt of session {session_name!r} for bundle "
                                f"{bundle_sha256}")
        return found

    # -- checks -------------------------------------------------------------------------

    def _instance(self, token: str, session_name: str, event: str) -> StoredInstance:
        instance = self._store.instance(_token_hash(token))
        if instance is None:
            self._refuse(session_name, event, RefusedError(
                "the token is not one of an attested instance"))
        try:
            self._records.check_instance(instance)
        except IntegrityError as error:
            self._refuse(session_name, event, error)
        if instance.session != session_name:
            self._refuse(session_name, event, RefusedError(
                f"the token belongs to an instance of another session, not {session_name!r}"))
        if instance.expires_at < time.time():
            self._refuse(session_name, event, RefusedError("the instance's token has expired"))
        return instance

    def _swap(self, instance: StoredInstance, move: Move, event: str) -> TagSwap:
        session_name, volume = instance.session, move.volume
        self._check_mounts(session_name, instance.service, volume, event)
        current = self._current(session_name, move, event)
        return TagSwap(current, self._records.next_tag(current, move.new))

    def _current(self, session_name: str, move: Move, event: str,
                 actor: str | None = None) -> StoredTag:
        """The volume's tag row, checked against its MAC, if its tag is ``move.old``."""
        if len(move.new) != 32 or not set(move.new) <= _HEX:
            self._refuse(session_name, event,
                         InputError("the new tag must be 32 hex characters"), actor)
        current = self._store.volume_tag(session_name, move.volume)
        if current is None:
            self._refuse(session_name, event, NotFoundError(
                f"session {session_name!r} has no volume {move.volume!r}"), actor)
        try:
            self._records.check_tag(current)
        except IntegrityError as error:
            self._refuse(session_name, event, error, actor)
        if current.tag != move.old:
            self._refuse(session_name, event, _stale(move.volume, move.old, current.tag), actor)
        return current

    def _check_mounts(self, session_name: str, service_name: str, volume: str,
                      event: str) -> None:
        """An instance moves tags only of the volumes its own service's image mounts."""
        session = self._sessions.stored(session_name)
        service = session.service(service_name) if session is not None else None
        if session is None or service is None:
            self._refuse(session_name, event, NotFoundError(
                f"session {session_name!r} has no service {service_name!r}"))
        image = session.image(service.image_name) if service.image_name else None
        if image is None or all(mount.name != volume for mount in image.volumes):
            self._refuse(session_name, event, RefusedError(
                f"an instance of service {service_name!r} may not move volume {volume!r}: "
                "its image does not mount it"))
        declared = session.volume(volume)
        if declared is not None and declared.import_ is not None:
            self._refuse(session_name, event, RefusedError(
                f"volume {volume!r} is imported: it is released read-only, and only the "
                "exporting session's instances move its tag"))

    def _receipt(self, instance: StoredInstance, swaps: list[TagSwap],
                 bundle_sha256: str | None, label: str | None) -> Receipt:
        assert self._signer is not None and instance.details is not None
        try:
            details = json.loads(instance.details)
            return Receipt(
                cas_key=self._signer.kid, session=instance.session,
                session_hash=details["session_hash"], service=instance.service,
                mode=details["mode"], tee=details["tee"], measurement=instance.measurement,
                platform=details["platform"], evidence_sha256=details["evidence_sha256"],
                instance=instance.token_hash, inputs=details["inputs"],
                outputs={swap.current.volume: OutputMove(old=swap.current.tag,
                                                         new=str(swap.new.tag))
                         for swap in swaps},
                bundle_sha256=bundle_sha256, issued_at=time.time(), label=label)
        except (ValueError, KeyError, TypeError):  # MAC'd, so only a CAS bug gets here
            raise IntegrityError("the instance's record cannot be stated in a receipt") from None

    def _refuse(self, session: str | None, event: str, error: TdappError,
                actor: str | None = None) -> NoReturn:
        self._store.record(session, event, actor, Outcome.REFUSED, error.message)
        raise error


def _moved(swap: TagSwap, instance: StoredInstance) -> str:
    return (f"{swap.current.volume}: {swap.current.tag} -> {swap.new.tag} (version "
            f"{swap.new.version}) by instance {instance.token_hash[:16]} of service "
            f"{instance.service!r}")


def _stale(volume: str, old: str | None, current: str | None) -> ConflictError:
    return ConflictError(f"volume {volume!r}: the old tag {old} is no longer current (now "
                         f"{current}); another run has changed the volume")


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()

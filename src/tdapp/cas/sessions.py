"""The CAS's trust decisions about sessions: who may create, read and change what.

One class, :class:`SessionAuthority`, owns the invariant that only a parsed,
validated session whose change its caller is entitled to make ever reaches the
store, and that a reader only ever sees a session its access policy allows.
A session inside a namespace (``ns/child``) is created only when ``ns`` exists
and its ``access_policy.create_sessions`` allows the creator, so nobody can
claim a name below a namespace before its owner creates it.
An update never moves a volume's tag: a volume the session already has keeps
its tag row (the document may restate the current tag, nothing else), and a
volume it adds starts at the tag the document gives; tags move only by
instances (:mod:`tdapp.cas.attestation`). Every tag row it reads or writes is
checked or sealed by :class:`~tdapp.cas.records.RecordMacs`.
A session's attestation mode is fixed when it is stored: a document that names
none gets the CAS's default (:class:`SessionDefaults`; an update keeps its
predecessor's mode), and a ``sim`` session names the LAS platforms whose
evidence it accepts, so what the hash covers is the mode that is enforced and
no later CAS flag changes it.
Every decision, accepted or refused, goes to the audit log with its reason.
It never stores a session unsealed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NoReturn

from tdapp.cas.challenges import ChallengeKeys
from tdapp.cas.records import RecordMacs
from tdapp.cas.sealing import MasterKey
from tdapp.cas.secret_store import SecretSealer
from tdapp.cas.secret_values import SecretValue, make_values
from tdapp.cas.store import AuditEvent, Outcome, Store, StoredSession, StoredTag
from tdapp.errors import (
    AuthenticationRequired,
    ConflictError,
    InputError,
    IntegrityError,
    NotFoundError,
    RefusedError,
    TdappError,
)
from tdapp.policy import (
    Identity,
    Session,
    SessionError,
    certificate_identity,
    parse_session,
    session_hash,
)
from tdapp.policy.access import is_identity
from tdapp.policy.enforced import parse_enforceable_session
from tdapp.policy.iexec_task import iexec_task_of
from tdapp.policy.modes import with_fixed_mode
from tdapp.policy.security import AttestationMode


@dataclass(frozen=True)
class SessionDefaults:
    """What the CAS fixes in a session whose document names no attestation mode.

    A production CAS makes such sessions ``hardware``. A ``--debug`` CAS makes them
    ``sim``, accepting evidence only from ``platforms``: the LAS platforms it was
    configured to trust (``tdapp up`` passes its own LAS's).
    """

    mode: AttestationMode = AttestationMode.HARDWARE
    platforms: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.mode not in (AttestationMode.HARDWARE, AttestationMode.SIM):
            raise ValueError(f"a CAS's default mode is hardware or sim, not {self.mode}")
        platforms = {platform.lower() for platform in self.platforms}
        if not all(len(p) == 64 and set(p) <= set("0123456789abcdef") for p in platforms):
            raise ValueError("a LAS platform id is 64 hex characters")
        # Sorted, as the session language keeps platforms: the stored text re-parses
        # to the same content, so to the same hash.
        object.__setattr__(self, "platforms", tuple(sorted(platforms)))


@dataclass(frozen=True)
class ReadSession:
    session: Session
    hash: str
    creator: Identity
    # What the session's export_public secrets show (certificates, public keys, values).
    public_secrets: dict[str, str]
    # iExec tasks: service -> the address of the task's enclave challenge key.
    enclave_challenges: dict[str, str]


@dataclass(frozen=True)
class OpenedSession:
    """A stored session with its secret values, for the CAS's own decisions only."""

    session: Session
    hash: str
    creator: Identity
    values: dict[str, SecretValue]


class SessionAuthority:
    def __init__(self, store: Store, master_key: MasterKey,
                 defaults: SessionDefaults | None = None) -> None:
        self._store = store
        self._master_key = master_key
        self.defaults = defaults or SessionDefaults()
        self.records = RecordMacs(master_key)
        self._sealer = SecretSealer(master_key)
        self.challenges = ChallengeKeys(master_key)
        # Sessions already unsealed and checked, by their exact stored record: a
        # sealed record is unique (random salt), so a hit is the same verified bytes.
        self._opened: dict[tuple[str, str, str, bytes], Session] = {}
        self._last_opened: dict[str, Session] = {}
        self._values: dict[tuple[str, str, str, bytes | None], dict[str, SecretValue]] = {}

    # -- changes ------------------------------------------------------------------

    def submit(self, text: str, who: Identity | None) -> tuple[str, str, bool]:
        """SCONE's ``POST /session``: create, or update when a predecessor is named.

        Returns (name, hash, created).
        """
        session = self._parse(text, who, "session.submit")
        if session.predecessor is None:
            return session.name, self._create(session, who), True
        return session.name, self._update(session, who), False

    def create(self, text: str, who: Identity | None) -> tuple[str, str]:
        session = self._parse(text, who, "session.create")
        if session.predecessor is not None:
            self._refuse(session.name, "session.create", who, InputError(
                "a new session must not name a predecessor; to change a session use update"))
        return session.name, self._create(session, who)

    def update(self, name: str, text: str, who: Identity | None) -> str:
        session = self._parse(text, who, "session.update")
        if session.name != name:
            self._refuse(name, "session.update", who, InputError(
                f"the document is named {session.name!r}, not {name!r}"))
        if session.predecessor is None:
            self._refuse(name, "session.update", who, InputError(
                "an update must name the current session hash as predecessor"))
        return self._update(session, who)

    def _create(self, session: Session, who: Identity | None) -> str:
        creator = self._require_identity(session.name, "session.create", who)
        self._check_stated_creator(session, creator, "session.create")
        self._check_namespace(session.name, creator)
        session = self._fix_mode(session, None, "session.create", creator)
        digest = session_hash(session, creator)
        values = self._make_values(session, {}, "session.create", creator)
        record = StoredSession(session.name, digest, creator, 1, self._seal(session, creator),
                               self._sealer.seal(values, session.name, creator, digest))
        # An imported volume's tag is the exporter's: the importer keeps no row for it.
        tags = [self.records.first_tag(session.name, volume.name, volume.fspf_tag)
                for volume in session.volumes if volume.import_ is None]
        try:
            self._store.insert_session(record, tags, (
                "session.create", creator, f"created with hash {digest}{_describe_tags(tags)}"))
        except ConflictError as error:
            self._refuse(session.name, "session.create", who, error)
        return digest

    def _update(self, session: Session, who: Identity | None) -> str:
        stored, current, actor = self.changeable(session.name, who, "session.update", "update")
        if session.predecessor != current.hash:
            self._refuse(session.name, "session.update", who, ConflictError(
                f"stale predecessor {session.predecessor}: session {session.name!r} is now at "
                f"{current.hash}; read it again and reapply your change"))
        self._check_stated_creator(session, current.creator, "session.update", actor)
        session = self._fix_mode(session, stored, "session.update", actor)
        added = self._added_tags(session, actor)
        digest = session_hash(session, current.creator)
        kept = self._sealer.unseal(current.sealed_secrets, current.name, current.creator,
                                   current.hash)
        values = self._make_values(session, kept, "session.update", actor)
        record = StoredSession(session.name, digest, current.creator, current.revision + 1,
                               self._seal(session, current.creator),
                               self._sealer.seal(values, session.name, current.creator, digest))
        if not self._store.replace_session(
                record, current.hash, added,
                ("session.update", actor,
                 f"updated {current.hash} -> {digest}{_describe_tags(added)}")):
            self._refuse(session.name, "session.update", who, ConflictError(
                f"session {session.name!r} changed concurrently; its predecessor "
                f"{current.hash} is no longer current"))
        return digest

    def changeable(self, name: str, who: Identity | None, event: str,
                   verb: str) -> tuple[Session, StoredSession, Identity]:
        """The stored session ``name`` (opened, and as stored) for an identity its
        ``access_policy.update`` allows to ``verb`` it; refused and audited otherwise."""
        actor = self._require_identity(name, event, who)
        current = self._store.get_session(name)
        if current is None:
            self._refuse(name, event, who, NotFoundError(f"no session named {name!r} to {verb}"))
        stored = self._unseal(current)
        if not stored.access_policy.allows("update", actor, current.creator):
            self._refuse(name, event, who, RefusedError(
                f"identity {actor} may not {verb} session {name!r} (access_policy.update)"))
        return stored, current, actor

    def _make_values(self, session: Session, kept: dict[str, SecretValue], event: str,
                     who: Identity) -> dict[str, SecretValue]:
        """The values of the session's own secrets: given, kept (``migrate``) or made now."""
        try:
            return make_values(session, kept)
        except TdappError as error:
            self._refuse(session.name, event, who, error)

    def delete(self, name: str, who: Identity | None) -> None:
        """Remove a session (``access_policy.update`` decides). Its sealed document, secret
        values and tag rows go; its audit log stays. Sessions below it (a namespace) must
        go first; a session importing from it is refused at its next attestation."""
        _, current, actor = self.changeable(name, who, "session.delete", "delete")
        if self._store.has_children(name):
            self._refuse(name, "session.delete", who, ConflictError(
                f"session {name!r} is a namespace with sessions in it: delete them first"))
        self._last_opened.pop(name, None)  # nonces are no longer issued from memory for it
        if not self._store.delete_session(name, current.hash, (
                "session.delete", actor, f"deleted at {current.hash}; its keys, secrets and "
                                         "tags are gone")):
            self._refuse(name, "session.delete", who, ConflictError(
                f"session {name!r} changed while it was being deleted; read it and retry"))

    def _check_stated_creator(self, session: Session, creator: Identity, event: str,
                              actor: Identity | None = None) -> None:
        """A document's ``creator:`` (as SCONE's read-back shows it) must be the session's
        real creator: the identity that creates it, or the stored creator on an update.
        Anything else would be stored as a claim nobody checked."""
        stated = session.creator
        if stated is None:
            return
        identity = stated if is_identity(stated) else certificate_identity(stated)
        if identity != creator:
            self._refuse(session.name, event, actor or creator, InputError(
                f"creator: the document names {identity}, but the session's creator is "
                f"{creator} (the identity that created it); remove creator"))

    def _fix_mode(self, session: Session, predecessor: Session | None, event: str,
                  who: Identity) -> Session:
        """``session`` with the attestation mode it will be judged by, stated in it
        (:func:`tdapp.policy.modes.with_fixed_mode` with this CAS's defaults)."""
        try:
            return with_fixed_mode(session, predecessor=predecessor,
                                   default=self.defaults.mode,
                                   trusted_platforms=self.defaults.platforms)
        except SessionError as error:
            self._refuse(session.name, event, who, error)

    def _added_tags(self, session: Session, actor: Identity) -> list[StoredTag]:
        """The tag rows an update adds; refuses one that would move an existing tag.

        A volume with a row keeps it: the document may leave its fspf_tag out or give
        the current one. A row that fails its MAC stops the update (naming it) rather
        than being carried on.
        """
        stored = self._store.volume_tags(session.name)
        added: list[StoredTag] = []
        for volume in session.volumes:
            if volume.import_ is not None:
                continue  # its tag is the exporter's row
            row = stored.get(volume.name)
            if row is None:
                added.append(self.records.first_tag(session.name, volume.name, volume.fspf_tag))
                continue
            try:
                self.records.check_tag(row)
            except IntegrityError as error:
                self._refuse(session.name, "session.update", actor, error)
            if volume.fspf_tag is not None and volume.fspf_tag != row.tag:
                self._refuse(session.name, "session.update", actor, ConflictError(
                    f"volume {volume.name!r}: the document gives fspf_tag {volume.fspf_tag}, "
                    f"but its current tag is {row.tag}; an update cannot move a tag (only "
                    "the session's instances do): read the session again "
                    "(tdapp session read) and reapply your change"))
        return added

    def _check_namespace(self, name: str, creator: Identity) -> None:
        """A session inside ``ns/…`` needs ``ns`` to exist and allow the creator to create.

        The parent must exist: otherwise whoever came first could claim names below a
        namespace before its owner creates it, and keep creating below them afterwards.
        """
        if "/" not in name:
            return
        parent = name.rpartition("/")[0]
        stored = self._store.get_session(parent)
        if stored is None:
            self._refuse(name, "session.create", creator, RefusedError(
                f"namespace {parent!r} does not exist: a session inside a namespace needs "
                "the namespace's access_policy.create_sessions (create the namespace first)"))
        if not self._unseal(stored).access_policy.allows(
                "create_sessions", creator, stored.creator):
            self._refuse(name, "session.create", creator, RefusedError(
                f"identity {creator} may not create sessions in namespace {parent!r} "
                "(access_policy.create_sessions)"))

    # -- reads ----------------------------------------------------------------------

    def read(self, name: str, who: Identity | None) -> ReadSession:
        # Every read is attributed to an identity, even under `ANY`: ANY means any
        # identity, and an anonymous request could otherwise not be audited.
        self._require_identity(name, "session.read", who)
        current = self._store.get_session(name)
        if current is None:
            raise NotFoundError(f"no session named {name!r}")
        session = self._unseal(current)
        if not session.access_policy.allows("read", who, current.creator):
            self._refuse(name, "session.read", who, RefusedError(
                f"{_describe(who)} may not read session {name!r} (access_policy.read)"))
        values = self._sealer.unseal(current.sealed_secrets, name, current.creator, current.hash)
        public = {secret.name: values[secret.name].public() for secret in session.secrets
                  if secret.export_public and secret.name in values}
        challenges = {service.name: self.challenges.for_task(name, task.task_id).address
                      for service in session.services
                      if (task := iexec_task_of(session, service)) is not None}
        return ReadSession(session, current.hash, current.creator, public, challenges)

    def created_by(self, who: Identity | None) -> list[dict[str, object]]:
        """The caller's own sessions (those it created): name, hash, mode, revision, times."""
        if who is None:
            raise AuthenticationRequired("a client certificate is required to list one's "
                                         "sessions (run: tdapp cas attest HOST:PORT)")
        creator = who
        listed = []
        for summary in self._store.sessions_created_by(creator):
            stored = self._store.get_session(summary.name)
            session = self._unseal(stored) if stored is not None else None
            mode = session.security.attestation.mode if session is not None else None
            listed.append({"name": summary.name, "hash": summary.hash,
                           "revision": summary.revision, "mode": str(mode) if mode else None,
                           "created_at": summary.created_at, "updated_at": summary.updated_at})
        return listed

    def may_read(self, name: str, who: Identity | None) -> bool:
        """Whether ``who`` is a reader of the session (for what a refusal may reveal)."""
        if who is None:
            return False
        current = self._store.get_session(name)
        return current is not None and self._unseal(current).access_policy.allows(
            "read", who, current.creator)

    def stored(self, name: str) -> Session | None:
        """The stored session for the CAS's own decisions (no reader check: never return it
        to a client)."""
        current = self._store.get_session(name)
        return None if current is None else self._unseal(current)

    def opened(self, name: str) -> OpenedSession | None:
        """The stored session with its secret values (no reader check: never return it or
        its values to a client; they go only into a configuration for an attested instance)."""
        current = self._store.get_session(name)
        return None if current is None else self._opened_from(current)

    def opened_with_tags(self, name: str) -> tuple[OpenedSession | None, dict[str, StoredTag]]:
        """:meth:`opened`, with the session's tag rows as stored with it (unchecked: check
        each with :attr:`records` before use), in one read."""
        current, tags = self._store.session_and_tags(name)
        return (None if current is None else self._opened_from(current)), tags

    def _opened_from(self, current: StoredSession) -> OpenedSession:
        session = self._unseal(current)
        # Keyed by the exact sealed bytes (a random salt makes each sealing unique), so
        # a hit is what unsealing these bytes gave before; a changed session is a miss.
        record = (current.name, current.creator, current.hash, current.sealed_secrets)
        values = self._values.get(record)
        if values is None:
            values = self._sealer.unseal(current.sealed_secrets, current.name,
                                         current.creator, current.hash)
            if len(self._values) >= _OPENED_CACHE:
                self._values.clear()
            self._values[record] = values
        return OpenedSession(session, current.hash, current.creator, dict(values))

    def recently_verified(self, name: str) -> Session | None:
        """The version of the session this CAS unsealed and verified last, if any; no
        database read (it may be older than what is stored now: see recently_stored)."""
        return self._last_opened.get(name)

    def recently_stored(self, name: str) -> Session | None:
        """A version of the session this CAS verified lately, else the stored one.

        Only for decisions that a later, stricter check repeats (issuing a nonce): it
        may be older than what another replica has stored since.
        """
        return self._last_opened.get(name) or self.stored(name)

    def volume_tag(self, name: str, volume: str, who: Identity | None) -> str | None:
        """The volume's current tag, for a reader of the session (checked against its MAC)."""
        self.read(name, who)
        row = self._store.volume_tag(name, volume)
        if row is None:
            raise NotFoundError(f"session {name!r} has no volume {volume!r}")
        try:
            return self.records.check_tag(row).tag
        except IntegrityError as error:
            self._refuse(name, "volume.read", who, error)

    def audit(self, name: str, who: Identity | None) -> list[AuditEvent]:
        self.read(name, who)
        return self._store.audit_events(name)

    # -- helpers ----------------------------------------------------------------------

    def _parse(self, text: str, who: Identity | None, event: str) -> Session:
        try:
            # Only what the CAS enforces may be stored (tdapp.policy.enforced).
            return parse_enforceable_session(text, source="session")
        except SessionError as error:
            self._store.record(None, event, who, Outcome.REFUSED, error.message)
            raise

    def _require_identity(self, name: str, event: str, who: Identity | None) -> Identity:
        if who is None:
            self._refuse(name, event, who, AuthenticationRequired(
                "a client certificate is required (run: tdapp cas attest HOST:PORT)"))
        return who

    def _refuse(self, name: str | None, event: str, who: Identity | None,
                error: TdappError) -> NoReturn:
        self._store.record(name, event, who, Outcome.REFUSED, error.message)
        raise error

    def _seal(self, session: Session, creator: Identity) -> bytes:
        return self._master_key.seal(session.to_yaml().encode("utf-8"),
                                     _context(session.name, creator))

    def _unseal(self, stored: StoredSession) -> Session:
        """Open a stored session; its row's name and creator must be the sealed ones.

        Binding the creator means that whoever can write the database, but has
        not the master key, cannot make themselves a session's creator.
        """
        record = (stored.name, stored.creator, stored.hash, stored.sealed_document)
        cached = self._opened.get(record)
        if cached is not None:
            return cached
        text = self._master_key.unseal(stored.sealed_document,
                                       _context(stored.name, stored.creator))
        session = parse_session(text.decode("utf-8"), source=f"stored session {stored.name}")
        if session_hash(session, stored.creator) != stored.hash:
            raise IntegrityError(f"stored session {stored.name!r} does not match its hash")
        if len(self._opened) >= _OPENED_CACHE:
            self._opened.clear()  # simple and thread-safe; refills with what is in use
            self._last_opened.clear()
        self._opened[record] = session
        self._last_opened[stored.name] = session
        return session


_OPENED_CACHE = 4096


def _context(name: str, creator: Identity) -> bytes:
    return b"tdapp/v1 session\x00" + name.encode("utf-8") + b"\x00" + creator.encode("ascii")


def _describe_tags(rows: list[StoredTag]) -> str:
    """The tag rows written, for the audit log (an operator compares versions with it)."""
    if not rows:
        return ""
    return "; volume tags " + ", ".join(
        f"{row.volume}={row.tag or 'none'} (version {row.version})" for row in rows)


def _describe(who: Identity | None) -> str:
    return "an anonymous client" if who is None else f"identity {who}"

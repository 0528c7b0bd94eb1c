"""Where the CAS keeps sessions, volume tags and its audit log.

SQLite under the CAS's state folder by default, PostgreSQL for a
``postgresql://`` URL; the schema is created and upgraded by Alembic on start.
Every change is all or nothing in one transaction, and every update is a
compare-and-swap on the value it replaces, so concurrent writers (threads, CAS
worker processes or replicas) can never lose an update. A process's changes go
through one writer thread that commits those arriving together in one
transaction (:mod:`tdapp.cas.batching`); none is answered before its commit.
On SQLite writes begin ``IMMEDIATE`` under a writer lock shared by the
processes on the file, and an attestation's statements bypass SQLAlchemy
(:mod:`tdapp.cas.sqlite_paths`). A volume's tag row, once written, is only ever swapped for its
successor (an update of the session adds rows, never replaces or removes one).
This module stores what it is given: it makes no trust decision, never sees a
plaintext secret (documents arrive sealed) and neither makes nor checks the
MACs of tag and instance rows (:mod:`tdapp.cas.records` does).
"""

from __future__ import annotations

import itertools
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, TypeVar

from alembic import command
from alembic.config import Config
from sqlalchemy import (
    Connection,
    Engine,
    bindparam,
    create_engine,
    delete,
    insert,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError as SqlIntegrityError
from sqlalchemy.exc import OperationalError, SQLAlchemyError

from tdapp.cas import sqlite_paths
from tdapp.cas.batching import GroupCommit
from tdapp.cas.hot_sql import HotStatements
from tdapp.cas.rows import (
    AuditEntry,
    AuditEvent,
    NewInstance,
    Outcome,
    SessionSummary,
    SpentNonce,
    StoredInstance,
    StoredSession,
    StoredTag,
    TagSwap,
)
from tdapp.cas.schema import audit_log, instances, nonces, receipts, sessions, volume_tags
from tdapp.errors import ConflictError, UnavailableError, UsageError

# The row types are imported from here by the authorities as well.
__all__ = [
    "AuditEntry",
    "AuditEvent",
    "NewInstance",
    "Outcome",
    "SessionSummary",
    "SpentNonce",
    "Store",
    "StoredInstance",
    "StoredSession",
    "StoredTag",
    "TagSwap",
    "database_url",
]

_MIGRATIONS = Path(__file__).with_name("migrations")
_PRUNE_EVERY = 512
T = TypeVar("T")


class _Stale(Exception):
    def __init__(self, volume: str) -> None:
        super().__init__(volume)
        self.volume = volume


def database_url(value: str | None, state_dir: Path) -> str:
    """Turn ``--db`` into an SQLAlchemy URL; the default is SQLite in the state folder."""
    if not value:
        return f"sqlite:///{state_dir / 'cas.db'}"
    if value.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg://" + value.split("://", 1)[1]
    if value.startswith(("sqlite:///", "postgresql+psycopg://")):
        return value
    raise UsageError(f"--db {value!r}: expected a postgresql:// or sqlite:/// URL")


class Store:
    """Transactions over the CAS tables."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.refusal_listener: Callable[[str, str], None] | None = None
        self._sqlite = url.startswith("sqlite")
        self._spends = itertools.count(1)
        self._hot = HotStatements(sqlite=True)  # SQLite only, see session_and_tags
        # Built once (SQLAlchemy then reuses its compiled form): a nonce's row, skipped
        # when its primary key exists, answering whether it was inserted.
        dialect_insert = sqlite_insert if self._sqlite else postgresql_insert
        self._spend = dialect_insert(nonces).on_conflict_do_nothing().returning(nonces.c.nonce)
        # No ping on checkout (a round trip per request): a connection that turns out to be
        # dead fails that one request with 503, and SQLAlchemy then discards the whole pool.
        options: dict[str, Any] = {"pool_pre_ping": False}
        if self._sqlite:
            options["connect_args"] = {"timeout": 30, "check_same_thread": False}
        else:
            options.update(pool_size=16, max_overflow=16, pool_timeout=10)
        self.engine: Engine = create_engine(url, **options)
        self._write_engine = self.engine
        self._writer_lock: sqlite_paths.WriterLock | None = None
        self._readers: sqlite_paths.ThreadReaders | None = None
        if self._sqlite:
            # Writes begin IMMEDIATE: a deferred transaction that reads before it writes
            # fails at once (no busy wait) when another process committed in between,
            # which several CAS processes on one database would meet all the time.
            self._write_engine = create_engine(url, **options)
            sqlite_paths.use_transactions(self.engine, "BEGIN")
            sqlite_paths.use_transactions(self._write_engine, "BEGIN IMMEDIATE")
            database = self._write_engine.url.database
            if database and database != ":memory:":
                self._writer_lock = sqlite_paths.WriterLock(Path(database + ".writer"))
                self._readers = sqlite_paths.ThreadReaders(database)
        # Every write of this process goes through one writer thread, which commits
        # the writes that arrive together in one transaction (tdapp.cas.batching).
        self._writes = GroupCommit(self._transaction)

    def migrate(self) -> None:
        config = Config()
        config.set_main_option("script_location", str(_MIGRATIONS))
        with self._transaction() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, "head")

    def close(self) -> None:
        self._writes.close()
        if self._readers is not None:
            self._readers.close()
        self.engine.dispose()
        self._write_engine.dispose()
        if self._writer_lock is not None:
            self._writer_lock.close()

    @property
    def commits(self) -> tuple[int, int]:
        """(transactions, writes) this process's writer committed: batching at work."""
        return self._writes.batches, self._writes.writes

    @contextmanager
    def _transaction(self) -> Iterator[Connection]:
        with self._writer_lock or nullcontext(), _translated(), \
                self._write_engine.begin() as connection:
            yield connection

    def _write(self, work: Callable[[Connection], T]) -> T:
        """Run ``work`` in a committed transaction (batched with concurrent writes)."""
        return self._writes.run(work)

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        with _translated(), self.engine.connect() as connection:
            yield connection

    # -- sessions ---------------------------------------------------------------

    def get_session(self, name: str) -> StoredSession | None:
        with self._read() as connection:
            row = connection.execute(_SESSION, {"name": name}).first()
        return None if row is None else _stored_session(row)

    def session_and_tags(self, name: str) -> tuple[StoredSession | None, dict[str, StoredTag]]:
        """The session's row and its volumes' tag rows, read together (one snapshot)."""
        if self._readers is not None:
            with _translated():
                return self._hot.session_and_tags_on(self._readers.connection(), name)
        with self._read() as connection:
            if self._sqlite:
                return self._hot.session_and_tags(connection, name)
            # PostgreSQL through SQLAlchemy, which sees (and recovers from) a lost
            # connection: a dead pooled connection then renews the whole pool.
            row = connection.execute(_SESSION, {"name": name}).first()
            if row is None:
                return None, {}
            tags = connection.execute(_SESSION_TAGS, {"session": name}).all()
        return _stored_session(row), {tag.volume: _stored_tag(tag) for tag in tags}

    def sessions_created_by(self, creator: str, limit: int = 1000) -> list[SessionSummary]:
        """The sessions ``creator`` created, by name (at most ``limit``)."""
        with self._read() as connection:
            rows = connection.execute(
                select(sessions.c.name, sessions.c.hash, sessions.c.revision,
                       sessions.c.created_at, sessions.c.updated_at)
                .where(sessions.c.creator == creator).order_by(sessions.c.name)
                .limit(limit)).all()
        return [SessionSummary(row.name, row.hash, row.revision, row.created_at,
                               row.updated_at) for row in rows]

    def insert_session(self, record: StoredSession, tags: Sequence[StoredTag],
                       audit: tuple[str, str | None, str]) -> None:
        """Create a session; ConflictError if the name is taken."""
        now = time.time()

        def work(connection: Connection) -> None:
            connection.execute(insert(sessions).values(
                name=record.name, hash=record.hash, creator=record.creator,
                revision=record.revision, sealed_document=record.sealed_document,
                sealed_secrets=record.sealed_secrets, created_at=now, updated_at=now))
            _put_tags(connection, record.name, tags, now)
            _append_audit(connection, now, record.name, *audit, Outcome.ACCEPTED)

        try:
            self._write(work)
        except SqlIntegrityError:
            raise ConflictError(f"a session named {record.name!r} already exists") from None

    def replace_session(self, record: StoredSession, expected_hash: str,
                        added_tags: Sequence[StoredTag],
                        audit: tuple[str, str | None, str]) -> bool:
        """Swap in a new revision if the stored hash is still ``expected_hash``.

        ``added_tags`` are the rows of volumes that have none yet; every other tag row
        stays as it is (tags move only by :meth:`swap_volume_tag`).
        """
        now = time.time()

        def work(connection: Connection) -> bool:
            result = connection.execute(
                update(sessions)
                .where(sessions.c.name == record.name, sessions.c.hash == expected_hash)
                .values(hash=record.hash, revision=record.revision,
                        sealed_document=record.sealed_document,
                        sealed_secrets=record.sealed_secrets, updated_at=now))
            if result.rowcount != 1:
                return False  # nothing written
            _put_tags(connection, record.name, added_tags, now)
            _append_audit(connection, now, record.name, *audit, Outcome.ACCEPTED)
            return True

        try:
            return self._write(work)
        except SqlIntegrityError:
            return False  # a row appeared meanwhile: whoever wrote it changed the session

    def has_children(self, name: str) -> bool:
        """Whether a session is named ``name/…`` (the session is a namespace in use)."""
        prefix = name.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "/%"
        with self._read() as connection:
            return connection.execute(select(sessions.c.name).where(
                sessions.c.name.like(prefix, escape="\\")).limit(1)).first() is not None

    def delete_session(self, name: str, expected_hash: str,
                       audit: tuple[str, str | None, str]) -> bool:
        """Remove the session (its sealed document and secrets) and its tag rows, if it is
        still at ``expected_hash``; its audit log stays. False if it changed meanwhile."""
        now = time.time()

        def work(connection: Connection) -> bool:
            result = connection.execute(delete(sessions).where(
                sessions.c.name == name, sessions.c.hash == expected_hash))
            if result.rowcount != 1:
                return False  # nothing written
            connection.execute(delete(volume_tags).where(volume_tags.c.session == name))
            # Its instances go too: a session made later under the same name must not take
            # tag reports from instances of this one.
            connection.execute(delete(instances).where(instances.c.session == name))
            _append_audit(connection, now, name, *audit, Outcome.ACCEPTED)
            return True

        return self._write(work)

    # -- volume tags ------------------------------------------------------------

    def volume_tag(self, session: str, volume: str) -> StoredTag | None:
        """The volume's tag row, or None when it has none."""
        with self._read() as connection:
            row = connection.execute(_TAG_ROWS.where(
                volume_tags.c.session == session, volume_tags.c.volume == volume)).first()
        return None if row is None else _stored_tag(row)

    def volume_tags(self, session: str) -> dict[str, StoredTag]:
        """Every volume of the session that has a row, by name."""
        with self._read() as connection:
            rows = connection.execute(_SESSION_TAGS, {"session": session}).all()
        return {row.volume: _stored_tag(row) for row in rows}

    def swap_volume_tag(self, current: StoredTag, new: StoredTag,
                        audit: tuple[str, str | None, str]) -> bool:
        """Replace the row ``current`` by ``new``; False if ``current`` is no longer the row."""
        event, actor, reason = audit
        return self.swap_volume_tags(current.session, [TagSwap(current, new)],
                                     [AuditEntry(event, Outcome.ACCEPTED, reason)],
                                     actor=actor) is None

    def swap_volume_tags(self, session: str, swaps: Sequence[TagSwap],
                         audits: Sequence[AuditEntry], *, actor: str | None) -> str | None:
        """Replace every row of ``swaps`` and write ``audits``, all or nothing; None when
        done, else the volume whose row is no longer the expected one."""
        now = time.time()
        for swap in swaps:
            if swap.current.session != session:
                raise ValueError(f"a tag row of {swap.current.session!r} swapped "
                                 f"with {session!r}")

        def work(connection: Connection) -> None:
            for swap in swaps:
                if not _swap_tag(connection, swap, now):
                    raise _Stale(swap.current.volume)  # rolls back the swaps before it
            for audit in audits:
                _append_audit(connection, now, session, audit.event, actor, audit.reason,
                              audit.outcome)

        try:
            self._write(work)
        except _Stale as stale:
            return stale.volume
        return None

    # -- attestation: nonces and instances -------------------------------------------

    def spend_nonce(self, nonce: SpentNonce, audits: Sequence[AuditEntry],
                    instance: NewInstance | None = None,
                    others: Sequence[tuple[str, AuditEntry]] = ()) -> bool:
        """Spend a nonce, write the audit entries and the new instance in one transaction.

        With an instance, nothing is written and False is returned when the nonce was
        already spent (a replay, possibly racing on another replica or in the same
        batch); without one (a refusal), the audit entries are written either way.
        ``others`` are entries for other sessions' logs (what an accepted attestation
        took from its exporters), written only with the instance.
        """
        now = time.time()
        for audit in audits:
            if audit.outcome is Outcome.REFUSED:
                self._note_refusal(audit.event, audit.reason)

        rows = [(nonce.session, audit) for audit in audits]
        if instance is not None:
            rows += others

        def work(connection: Connection) -> bool:
            if self._sqlite:
                written = self._hot.spend_nonce(connection, nonce, now, instance, rows)
            else:
                written = self._spend_with_core(connection, nonce, now, instance, rows)
            if written and next(self._spends) % _PRUNE_EVERY == 0:
                # An expired nonce is refused by its MAC'd expiry; its row can go.
                connection.execute(delete(nonces).where(nonces.c.expires_at < now - 60))
            return written

        return self._write(work)

    def _spend_with_core(self, connection: Connection, nonce: SpentNonce, now: float,
                         instance: NewInstance | None,
                         rows: Sequence[tuple[str, AuditEntry]]) -> bool:
        """:meth:`spend_nonce` on PostgreSQL, the same rows through SQLAlchemy Core."""
        fresh = connection.execute(self._spend, {
            "nonce": nonce.digest, "session": nonce.session, "service": nonce.service,
            "expires_at": nonce.expires_at, "used_at": now}).first() is not None
        if instance is not None:
            if not fresh:
                return False  # the insert above skipped the row: nothing written
            connection.execute(_NEW_INSTANCE, {
                "token_hash": instance.token_hash, "session": nonce.session,
                "service": nonce.service, "measurement": instance.measurement,
                "created_at": now, "expires_at": instance.expires_at, "mac": instance.mac,
                "details": instance.details})
        connection.execute(_AUDIT, [
            {"at": now, "session": session, "event": audit.event, "actor": None,
             "outcome": audit.outcome, "reason": audit.reason} for session, audit in rows])
        return True


    def instance(self, token_hash: str) -> StoredInstance | None:
        """The row of the instance holding this token, if any."""
        with self._read() as connection:
            row = connection.execute(
                select(instances).where(instances.c.token_hash == token_hash)).first()
        if row is None:
            return None
        return StoredInstance(row.token_hash, row.session, row.service, row.measurement,
                              row.expires_at, row.mac, row.details)

    # -- receipts ---------------------------------------------------------------

    def commit_run(self, token_hash: str, session: str, swaps: Sequence[TagSwap],
                   receipt: str, bundle_sha256: str | None,
                   audits: Sequence[AuditEntry], *, label: str | None = None,
                   url: str | None = None) -> str | None:
        """Move every tag of ``swaps`` and keep the run's receipt, all in one transaction.

        Returns None when done; otherwise nothing is written and the answer is why: the
        volume whose tag is no longer the expected one, or ``"committed"`` when this
        instance already committed (one commit per instance).
        """
        now = time.time()

        def work(connection: Connection) -> None:
            connection.execute(insert(receipts).values(
                token_hash=token_hash, session=session, bundle_sha256=bundle_sha256,
                receipt=receipt, created_at=now, label=label, url=url))
            for swap in swaps:
                if not _swap_tag(connection, swap, now):
                    raise _Stale(swap.current.volume)  # rolls back the receipt too
            connection.execute(_AUDIT, [
                {"at": now, "session": session, "event": audit.event, "actor": None,
                 "outcome": audit.outcome, "reason": audit.reason} for audit in audits])

        try:
            self._write(work)
        except _Stale as stale:
            return stale.volume
        except SqlIntegrityError:
            return "committed"
        return None

    def labelled_run(self, session: str, label: str) -> tuple[str, str | None] | None:
        """(receipt, url) of the session's committed run with this label, if any."""
        with self._read() as connection:
            row = connection.execute(
                select(receipts.c.receipt, receipts.c.url)
                .where(receipts.c.session == session, receipts.c.label == label)
                .order_by(receipts.c.created_at)).first()
        return None if row is None else (str(row.receipt), row.url)

    def receipt_for(self, session: str, bundle_sha256: str) -> str | None:
        """The receipt of the session's run that uploaded this bundle, if any."""
        with self._read() as connection:
            row = connection.execute(
                select(receipts.c.receipt).where(receipts.c.session == session,
                                                 receipts.c.bundle_sha256 == bundle_sha256)
                .order_by(receipts.c.created_at.desc())).first()
        return None if row is None else str(row.receipt)

    # -- audit ------------------------------------------------------------------

    def record(self, session: str | None, event_name: str, actor: str | None, outcome: Outcome,
               reason: str) -> None:
        if outcome is Outcome.REFUSED:
            self._note_refusal(event_name, reason)
        now = time.time()
        self._write(lambda connection: _append_audit(connection, now, session, event_name,
                                                     actor, reason, outcome))

    def _note_refusal(self, event_name: str, reason: str) -> None:
        if self.refusal_listener is not None:
            self.refusal_listener(event_name, reason)

    def audit_events(self, session: str | None, limit: int = 1000) -> list[AuditEvent]:
        query = select(audit_log).order_by(audit_log.c.id.desc()).limit(limit)
        if session is not None:
            query = query.where(audit_log.c.session == session)
        with self._read() as connection:
            rows = connection.execute(query).all()
        return [AuditEvent(r.id, r.at, r.session, r.event, r.actor, Outcome(r.outcome), r.reason)
                for r in reversed(rows)]


# The statements of every attestation, built once: SQLAlchemy reuses a statement
# object's compiled form, where building one per call costs as much as running it.
_TAG_ROWS = select(volume_tags.c.session, volume_tags.c.volume, volume_tags.c.tag,
                  volume_tags.c.version, volume_tags.c.mac)
_SESSION_TAGS = _TAG_ROWS.where(volume_tags.c.session == bindparam("session"))
_SESSION = select(sessions).where(sessions.c.name == bindparam("name"))
_NEW_INSTANCE = insert(instances)
_AUDIT = insert(audit_log)
_SWAP_TAG = (update(volume_tags)
             .where(volume_tags.c.session == bindparam("s_session"),
                    volume_tags.c.volume == bindparam("s_volume"),
                    volume_tags.c.tag == bindparam("s_tag"),
                    volume_tags.c.version == bindparam("s_version"),
                    volume_tags.c.mac == bindparam("s_mac"))
             .values(tag=bindparam("tag"), version=bindparam("version"), mac=bindparam("mac"),
                     updated_at=bindparam("updated_at")))


def _swap_tag(connection: Connection, swap: TagSwap, now: float) -> bool:
    """Compare-and-swap one tag row: replaced only if it is exactly ``swap.current`` still."""
    current = swap.current
    if current.tag is not None and current.mac is not None:  # every row the CAS wrote
        result = connection.execute(_SWAP_TAG, {
            "s_session": current.session, "s_volume": current.volume, "s_tag": current.tag,
            "s_version": current.version, "s_mac": current.mac, "tag": swap.new.tag,
            "version": swap.new.version, "mac": swap.new.mac, "updated_at": now})
        return bool(result.rowcount == 1)
    same_tag = (volume_tags.c.tag.is_(None) if current.tag is None
                else volume_tags.c.tag == current.tag)
    result = connection.execute(
        update(volume_tags)
        .where(volume_tags.c.session == current.session, volume_tags.c.volume == current.volume,
               same_tag, volume_tags.c.version == current.version,
               volume_tags.c.mac == current.mac)
        .values(tag=swap.new.tag, version=swap.new.version, mac=swap.new.mac, updated_at=now))
    return bool(result.rowcount == 1)


def _stored_session(row: Any) -> StoredSession:
    return StoredSession(row.name, row.hash, row.creator, row.revision,
                         bytes(row.sealed_document),
                         None if row.sealed_secrets is None else bytes(row.sealed_secrets))


def _stored_tag(row: Any) -> StoredTag:
    return StoredTag(row.session, row.volume, row.tag, row.version, row.mac)


def _put_tags(connection: Connection, session: str, tags: Sequence[StoredTag],
              now: float) -> None:
    for row in tags:
        if row.session != session:
            raise ValueError(f"a tag row of session {row.session!r} stored with {session!r}")
        connection.execute(insert(volume_tags).values(
            session=session, volume=row.volume, tag=row.tag, version=row.version,
            mac=row.mac, updated_at=now))


def _append_audit(connection: Connection, at: float, session: str | None, event_name: str,
                  actor: str | None, reason: str, outcome: Outcome) -> None:
    connection.execute(insert(audit_log).values(
        at=at, session=session, event=event_name, actor=actor, outcome=outcome, reason=reason))


@contextmanager
def _translated() -> Iterator[None]:
    """Turn a lost database connection into a clean 'unavailable' error."""
    try:
        yield
    except OperationalError as error:
        raise UnavailableError(f"the CAS database is unavailable: {error.orig}") from None
    except (SqlIntegrityError, sqlite3.IntegrityError):
        raise
    except sqlite3.Error as error:  # from tdapp.cas.hot_sql
        raise UnavailableError(f"the CAS database is unavailable: {error}") from None
    except SQLAlchemyError as error:
        raise UnavailableError(f"the CAS database failed: {type(error).__name__}") from None

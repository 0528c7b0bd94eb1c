"""The statements of every attestation, run through the database driver itself.

An attestation reads its session with its tag rows and writes its nonce, its
instance and its audit entries. Through SQLAlchemy Core each statement costs
about as much CPU as the database's own work for it, so these few run as plain
SQL on the driver connection SQLAlchemy holds (sqlite3 or psycopg): inside the
transaction :mod:`tdapp.cas.store` begins and ends, against the tables of
:mod:`tdapp.cas.schema`, in SQL both databases read alike. The store uses them on SQLite; on
PostgreSQL it keeps SQLAlchemy, which notices a lost server connection and
renews its whole pool (a raw driver error would not tell it). This module only
stores and reads rows; it decides nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection

from tdapp.cas.rows import AuditEntry, NewInstance, SpentNonce, StoredSession, StoredTag

_SESSION = ("SELECT name, hash, creator, revision, sealed_document, sealed_secrets "
            "FROM sessions WHERE name = ?")
_TAGS = "SELECT session, volume, tag, version, mac FROM volume_tags WHERE session = ?"
# Skips the row of a nonce spent already (its digest is the primary key): one winner.
_SPEND = ("INSERT INTO nonces (nonce, session, service, expires_at, used_at) "
          "VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING")
_INSTANCE = ("INSERT INTO instances (token_hash, session, service, measurement, created_at, "
             "expires_at, mac, details) VALUES (?, ?, ?, ?, ?, ?, ?, ?)")
_AUDIT = ("INSERT INTO audit_log (at, session, event, actor, outcome, reason) "
          "VALUES (?, ?, ?, ?, ?, ?)")


class HotStatements:
    """The statements in the driver's parameter style (``?`` for sqlite3, ``%s`` psycopg)."""

    def __init__(self, *, sqlite: bool) -> None:
        self._sqlite = sqlite

        def style(sql: str) -> str:
            return sql if sqlite else sql.replace("?", "%s")

        self._session, self._tags = style(_SESSION), style(_TAGS)
        self._spend, self._instance, self._audit = style(_SPEND), style(_INSTANCE), style(_AUDIT)

    def session_and_tags(self, connection: Connection,
                         name: str) -> tuple[StoredSession | None, dict[str, StoredTag]]:
        """The session's row and its tag rows, in one read transaction (one snapshot)."""
        return self.session_and_tags_on(connection.connection.driver_connection, name)

    def session_and_tags_on(self, raw: Any,
                            name: str) -> tuple[StoredSession | None, dict[str, StoredTag]]:
        """:meth:`session_and_tags` on a driver connection itself."""
        cursor = raw.cursor()
        try:
            if self._sqlite:
                cursor.execute("BEGIN")  # sqlite3 is left in autocommit (sqlite_paths)
            # psycopg began a transaction itself; the pool's reset on return ends both.
            cursor.execute(self._session, (name,))
            row = cursor.fetchone()
            tags = [] if row is None else cursor.execute(self._tags, (name,)).fetchall()
        finally:
            if self._sqlite:
                cursor.execute("ROLLBACK")
            cursor.close()
        if row is None:
            return None, {}
        session = StoredSession(row[0], row[1], row[2], row[3], bytes(row[4]),
                                None if row[5] is None else bytes(row[5]))
        return session, {tag[1]: StoredTag(*tag) for tag in tags}

    def spend_nonce(self, connection: Connection, nonce: SpentNonce, now: float,
                    instance: NewInstance | None,
                    audits: Sequence[tuple[str, AuditEntry]]) -> bool:
        """:meth:`tdapp.cas.store.Store.spend_nonce`'s transaction body: False, having
        written nothing, when an instance is given and the nonce is spent already."""
        raw: Any = connection.connection.driver_connection
        cursor = raw.cursor()
        try:
            cursor.execute(self._spend, (nonce.digest, nonce.session, nonce.service,
                                         nonce.expires_at, now))
            fresh = cursor.rowcount == 1
            if instance is not None:
                if not fresh:
                    return False
                cursor.execute(self._instance, (instance.token_hash, nonce.session,
                                                nonce.service, instance.measurement, now,
                                                instance.expires_at, instance.mac,
                                                instance.details))
            cursor.executemany(self._audit, [(now, session, audit.event, None,
                                              str(audit.outcome), audit.reason)
                                             for session, audit in audits])
        finally:
            cursor.close()
        return True

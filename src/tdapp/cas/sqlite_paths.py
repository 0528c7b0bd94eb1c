"""What the CAS store does differently on SQLite: its transactions and a writer lock.

:func:`use_transactions` begins every transaction itself (writes ``BEGIN
IMMEDIATE``) and sets WAL with ``synchronous=FULL``; :class:`WriterLock` lets
several CAS processes on one file take turns without SQLite's polling;
:class:`ThreadReaders` gives each thread its own connection for the reads of
every attestation. This module decides nothing.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, event

from tdapp.errors import UnavailableError


class WriterLock:
    """An exclusive ``flock`` held around each SQLite write transaction.

    SQLite makes a second process's writer poll for its lock, sleeping longer
    each time (up to 100 ms a try); several CAS processes on one file then wait
    far longer than the write they wait for. A blocking ``flock`` hands the
    turn over the moment it is released; SQLite's own locking stays underneath
    (any other writer, without this lock, is still excluded by SQLite)."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._fd: int | None = None
        self._guard = threading.Lock()

    def __enter__(self) -> None:
        self._guard.acquire()
        try:
            if self._fd is None:
                self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        except OSError as error:
            self._guard.release()
            raise UnavailableError(f"cannot lock {self._path}: {error.strerror}") from None

    def __exit__(self, *_: object) -> None:
        try:
            if self._fd is not None:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            self._guard.release()

    def close(self) -> None:
        with self._guard:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


def use_transactions(engine: Engine, begin: str) -> None:
    """Take transactions out of pysqlite's hands (it begins them late, and never
    IMMEDIATE), and begin each with ``begin``."""

    def connected(connection: Any, record: Any) -> None:
        connection.isolation_level = None
        _sqlite_pragmas(connection, record)

    def began(connection: Connection) -> None:
        connection.exec_driver_sql(begin)

    event.listen(engine, "connect", connected)
    event.listen(engine, "begin", began)


def _sqlite_pragmas(connection: Any, _record: Any) -> None:
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")  # an acknowledged write survives a crash
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


class ThreadReaders:
    """One sqlite3 connection per thread, kept, for the reads every attestation makes:
    checking one out of SQLAlchemy's pool and back costs more than the read. Each read
    runs in its own transaction (``BEGIN`` ... ``ROLLBACK``), so a kept connection never
    holds an old snapshot. A file database only: ``:memory:`` is one per connection."""

    def __init__(self, database: str) -> None:
        self._database = database
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._guard = threading.Lock()
        self._closed = False

    def connection(self) -> sqlite3.Connection:
        found: sqlite3.Connection | None = getattr(self._local, "connection", None)
        if found is None:
            found = sqlite3.connect(self._database, timeout=30, isolation_level=None,
                                    check_same_thread=False)
            _sqlite_pragmas(found, None)
            with self._guard:
                if self._closed:
                    found.close()
                    raise UnavailableError("the CAS store is closed")
                self._all.append(found)
            self._local.connection = found
        return found

    def close(self) -> None:
        with self._guard:
            self._closed = True
            connections, self._all = self._all, []
        for connection in connections:
            connection.close()

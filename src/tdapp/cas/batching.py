"""Group commit: the CAS's concurrent writes share one transaction, one commit, one fsync.

A write is a function of a connection, run by :meth:`GroupCommit.run` on one
writer thread: every write that arrives while the previous batch is being
committed goes into the next batch, which runs them in order in one
transaction. Nobody is told a write succeeded before the commit that holds it
returned, so an acknowledged write is as durable as one committed alone
(``synchronous=FULL`` on SQLite). If any write of a batch raises, the whole
batch is rolled back and every write of it is run again alone, in its own
transaction, exactly as without batching: a write's outcome (a refusal, a lost
compare-and-swap, an integrity error) never depends on what shared its batch,
and a write that fails never takes another with it. If the commit itself fails,
every write of the batch gets that error and none is run again (the commit may
have taken effect: a connection lost during COMMIT), as a write committing
alone would.
Writes of one batch see the earlier ones of that batch, as if committed one
after the other. This module must never answer a write before its commit, nor
run a write twice in transactions that both commit.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, Generic, TypeVar

from sqlalchemy import Connection

T = TypeVar("T")
MAX_BATCH = 128

Transaction = Callable[[], AbstractContextManager[Connection]]


class _Write(Generic[T]):
    """One caller's write. ``done`` is a lock taken at birth and released by the writer
    once the write's outcome is set: a plain lock costs less than an Event, and every
    attestation makes one."""

    __slots__ = ("done", "error", "result", "work")

    def __init__(self, work: Callable[[Connection], T]) -> None:
        self.work = work
        self.done = threading.Lock()
        self.done.acquire()
        self.result: Any = None
        self.error: BaseException | None = None


class GroupCommit:
    """One writer thread committing the writes of all other threads in batches."""

    def __init__(self, transaction: Transaction, max_batch: int = MAX_BATCH) -> None:
        self._transaction = transaction
        self._max_batch = max_batch
        self._pending: deque[_Write[Any]] = deque()
        self._wake = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        self.batches = 0  # how many transactions served how many writes (for tests, metrics)
        self.writes = 0

    def run(self, work: Callable[[Connection], T]) -> T:
        """Run ``work`` in a committed transaction and return what it returned (or raise
        what it raised, after its own transaction was rolled back)."""
        write: _Write[T] = _Write(work)
        with self._wake:
            if self._closed:
                raise RuntimeError("the CAS store is closed")
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name="tdapp-cas-writer",
                                                daemon=True)
                self._thread.start()
            self._pending.append(write)
            self._wake.notify()
        write.done.acquire()  # released once the outcome is set
        if write.error is not None:
            raise write.error
        result: T = write.result
        return result

    def close(self) -> None:
        """Finish the writes already queued, then stop the writer thread."""
        with self._wake:
            self._closed = True
            self._wake.notify()
            thread = self._thread
        if thread is not None:
            thread.join()

    def _serve(self) -> None:
        while True:
            with self._wake:
                while not self._pending and not self._closed:
                    self._wake.wait()
                if not self._pending:
                    return
                batch = [self._pending.popleft()
                         for _ in range(min(self._max_batch, len(self._pending)))]
            self._commit(batch)

    def _commit(self, batch: list[_Write[Any]]) -> None:
        if len(batch) > 1:
            results: list[Any] | None = None
            try:
                with self._transaction() as connection:
                    results = [write.work(connection) for write in batch]
            except BaseException as error:
                if results is not None:
                    # Every write ran and the commit itself failed: whether it took effect
                    # is unknown (a connection lost during COMMIT), so none is run again;
                    # each caller gets the error, as it would have committing alone.
                    self._count(1, len(batch))
                    for write in batch:
                        write.error = error
                        write.done.release()
                    return
            else:
                self._count(1, len(batch))
                for write, result in zip(batch, results, strict=True):
                    write.result = result
                    write.done.release()
                return
        for write in batch:
            try:
                with self._transaction() as connection:
                    write.result = write.work(connection)
            except BaseException as error:  # handed to the waiting caller
                write.error = error
            self._count(1, 1)
            write.done.release()

    def _count(self, batches: int, writes: int) -> None:
        self.batches += batches
        self.writes += writes


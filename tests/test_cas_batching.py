"""Group commit (tdapp.cas.batching) on a real SQLite file, and the Store's writes through it.

A batch whose one write fails must not take the others with it, nor leave that
write's rows behind; a write is answered only after its commit; and racing
writers through the Store keep its compare-and-swap promises (one nonce spent
once, one tag row swapped once).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import Connection, create_engine, text

from tdapp.cas.batching import GroupCommit
from tdapp.cas.records import RecordMacs
from tdapp.cas.sealing import MasterKey
from tdapp.cas.store import (
    AuditEntry,
    NewInstance,
    Outcome,
    SpentNonce,
    Store,
    StoredSession,
    database_url,
)


def test_a_failing_write_in_a_batch_takes_no_other_write_with_it(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'db'}")
    with engine.begin() as connection:
        connection.execute(text("CREATE TABLE t (k TEXT PRIMARY KEY)"))
    transactions: list[int] = []

    @contextmanager
    def transaction() -> Iterator[Connection]:
        with engine.begin() as connection:
            yield connection
        transactions.append(1)

    commit = GroupCommit(transaction)
    gate, entered = threading.Event(), threading.Event()

    def hold(connection: Connection) -> str:
        entered.set()
        gate.wait(10)  # the writer is busy: what arrives meanwhile forms one batch
        connection.execute(text("INSERT INTO t VALUES ('held')"))
        return "held"

    def insert(key: str, fail: bool = False) -> str:
        def work(connection: Connection) -> str:
            connection.execute(text("INSERT INTO t VALUES (:k)"), {"k": key})
            if fail:
                raise ValueError(f"{key} refuses")
            return key
        return commit.run(work)

    with ThreadPoolExecutor(4) as pool:
        first = pool.submit(commit.run, hold)
        assert entered.wait(10)
        futures = [pool.submit(insert, "a"), pool.submit(insert, "bad", True),
                   pool.submit(insert, "b")]
        while len(commit._pending) < 3:  # all three queued behind ``hold``
            time.sleep(0.01)
        gate.set()
        assert first.result(10) == "held"
        assert futures[0].result(10) == "a" and futures[2].result(10) == "b"
        with pytest.raises(ValueError, match="bad refuses"):
            futures[1].result(10)
    with engine.connect() as connection:
        keys = {row[0] for row in connection.execute(text("SELECT k FROM t"))}
    assert keys == {"held", "a", "b"}  # the failed write's row was rolled back
    commit.close()
    # The held write alone, the batch of three (rolled back), then each of them alone.
    assert commit.batches == 4 and commit.writes == 4


@pytest.fixture()
def store(tmp_path: Path) -> Iterator[Store]:
    store = Store(database_url(None, tmp_path))
    store.migrate()
    yield store
    store.close()


def _session(store: Store, macs: RecordMacs) -> None:
    store.insert_session(StoredSession("s", "h" * 64, "c" * 64, 1, b"sealed"),
                         [macs.first_tag("s", "out", "00" * 16)], ("session.create", None, "t"))


def test_racing_spends_of_one_nonce_accept_one(store: Store) -> None:
    _session(store, RecordMacs(MasterKey(bytes(32))))
    spent = SpentNonce("n" * 64, "s", "app", time.time() + 60)
    barrier = threading.Barrier(16)

    def spend(index: int) -> bool:
        barrier.wait(10)
        return store.spend_nonce(spent, [AuditEntry("attest", Outcome.ACCEPTED, "ok")],
                                 NewInstance(f"{index:064d}", "m" * 64, time.time() + 60, "x"))

    with ThreadPoolExecutor(16) as pool:
        outcomes = list(pool.map(spend, range(16)))
    assert outcomes.count(True) == 1, outcomes
    accepted = [e for e in store.audit_events("s") if e.event == "attest"]
    assert len(accepted) == 1  # a replay writes nothing, not even its audit entry
    transactions, writes = store.commits
    assert transactions >= 1 and writes >= 16


def test_racing_swaps_of_one_tag_row_move_it_once(store: Store) -> None:
    macs = RecordMacs(MasterKey(bytes(32)))
    _session(store, macs)
    current = store.volume_tag("s", "out")
    assert current is not None
    barrier = threading.Barrier(12)

    def swap(index: int) -> bool:
        barrier.wait(10)
        return store.swap_volume_tag(current, macs.next_tag(current, f"{index:032x}"),
                                     ("volume.tag", None, f"moved by {index}"))

    with ThreadPoolExecutor(12) as pool:
        outcomes = list(pool.map(swap, range(12)))
    assert outcomes.count(True) == 1, outcomes
    stored = store.volume_tag("s", "out")
    assert stored is not None and stored.version == current.version + 1
    assert stored.tag == f"{outcomes.index(True):032x}"

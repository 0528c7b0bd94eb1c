"""Fault injection on a live CAS: SIGKILL under load, and PostgreSQL going away under it.

Nothing is mocked: the CAS is a ``tdapp cas serve`` child process, PostgreSQL is
the real server of the ``postgres`` fixture, and faults are real signals,
``pg_terminate_backend`` and ``pg_ctl stop``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import pytest
from cas_fixtures import (
    HOST,
    CasServer,
    MakeUser,
    Postgres,
    SessionDoc,
    StartCas,
    User,
    unique_name,
)

from tdapp.policy import parse_session, session_hash
from tdapp.policy.modes import with_fixed_mode
from tdapp.policy.security import AttestationMode

WRITERS = 6


def expected_hash(doc: SessionDoc, creator: str) -> str:
    """The hash the CAS must give ``doc`` (computed here from the document we send, with
    the mode a production CAS fixes in it)."""
    as_stored = with_fixed_mode(parse_session(doc.text()), predecessor=None,
                                default=AttestationMode.HARDWARE, trusted_platforms=())
    return session_hash(as_stored, creator)


def create(alice: User, server: CasServer, doc: SessionDoc) -> str:
    with alice.http(server) as http:
        response = http.post("/v1/sessions", content=doc.body())
    assert response.status_code == 201, response.text
    return str(response.json()["hash"])


@dataclass
class Chain:
    """One writer's session: every acknowledged hash, and the one in flight when it stopped."""

    name: str
    acknowledged: list[str] = field(default_factory=list)
    commands: dict[str, str] = field(default_factory=dict)
    in_flight: str | None = None
    unexpected: list[str] = field(default_factory=list)
    ended_by: str = ""


def chain_updates(alice: User, server: CasServer, chain: Chain, stop: threading.Event) -> None:
    step = 0
    with alice.http(server, timeout=15) as http:
        while not stop.is_set():
            step += 1
            command = f"/{chain.name}/step-{step}"
            doc = SessionDoc(chain.name, command=command, predecessor=chain.acknowledged[-1])
            digest = expected_hash(doc, alice.identity)
            chain.commands[digest] = command
            chain.in_flight = digest
            try:
                response = http.put(f"/v1/sessions/{chain.name}", content=doc.body())
            except httpx.HTTPError as error:
                chain.ended_by = f"{type(error).__name__}: {error}"
                return
            if response.status_code != 200:
                chain.unexpected.append(f"{response.status_code} {response.text}")
                return
            answered = response.json()["hash"]
            if answered != digest:
                chain.unexpected.append(f"answered hash {answered}, expected {digest}")
                return
            chain.acknowledged.append(digest)
            chain.in_flight = None


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest) -> str | None:
    if request.param == "sqlite":
        return None
    postgres: Postgres = request.getfixturevalue("postgres")
    return postgres.create_database()


@pytest.mark.timeout(120)
def test_sigkill_under_update_load_loses_no_acknowledged_update(
        cas_server: StartCas, user: MakeUser, database: str | None) -> None:
    server = cas_server(db=database)
    alice = user(unique_name("alice"))
    alice.attest(server)
    chains = []
    for _ in range(WRITERS):
        name = unique_name("kill")
        doc = SessionDoc(name, command=f"/{name}/step-0")
        first = create(alice, server, doc)
        assert first == expected_hash(doc, alice.identity)
        chains.append(Chain(name, [first], {first: doc.command}))

    stop = threading.Event()
    threads = [threading.Thread(target=chain_updates, args=(alice, server, chain, stop),
                                daemon=True) for chain in chains]
    for thread in threads:
        thread.start()
    time.sleep(1.0)
    assert server.process is not None
    os.killpg(server.process.pid, signal.SIGKILL)
    server.process.wait(timeout=15)
    stop.set()
    for thread in threads:
        thread.join(timeout=30)
        assert not thread.is_alive(), "a writer hung after the CAS was killed"

    assert server.process.returncode == -signal.SIGKILL
    for chain in chains:
        assert chain.unexpected == [], (chain.name, chain.unexpected)
    assert sum(len(chain.acknowledged) - 1 for chain in chains) >= WRITERS, \
        "the load did not get going before the kill"

    server.start()  # same state folder, same database, same port
    with alice.http(server) as http:
        for chain in chains:
            response = http.get(f"/v1/sessions/{chain.name}")
            assert response.status_code == 200, (chain.name, response.text)
            stored = response.json()
            allowed = {chain.acknowledged[-1]}
            if chain.in_flight is not None:
                allowed.add(chain.in_flight)
            assert stored["hash"] in allowed, (
                f"{chain.name}: stored {stored['hash']} (step "
                f"{chain.commands.get(stored['hash'], 'unknown')}), last acknowledged "
                f"{chain.acknowledged[-1]} ({len(chain.acknowledged) - 1} updates), "
                f"in flight {chain.in_flight}")
            # The stored document is whole: it parses and hashes to the stored hash.
            parsed = parse_session(stored["session"])
            assert stored["creator"] == alice.identity
            assert session_hash(parsed, stored["creator"]) == stored["hash"]
            assert parsed.name == chain.name
            assert f"command: {chain.commands[stored['hash']]}\n" in stored["session"]
            # And the chain goes on from there.
            doc = SessionDoc(chain.name, command="/after-restart", predecessor=stored["hash"])
            after = http.put(f"/v1/sessions/{chain.name}", content=doc.body())
            assert after.status_code == 200, after.text
    assert server.unexpected_failures() == []


# -- PostgreSQL going away --------------------------------------------------------------


def psql(postgres: Postgres, sql: str) -> str:
    done = postgres.run("psql", "-h", str(postgres.socket_dir), "-p", str(postgres.port),
                        "-U", "postgres", "-d", "postgres", "-At", "-c", sql)
    return done.stdout.decode()


def restart_postgres(postgres: Postgres, down_for: float) -> tuple[float, float]:
    """``pg_ctl stop -m fast``, wait, start again on the same data folder and port.

    Returns (stopped, restarting): the times between which PostgreSQL was surely down.
    """
    try:
        postgres.run("pg_ctl", "-D", str(postgres.data_dir), "-w", "-t", "60", "stop",
                     "-m", "fast", timeout=90)
        stopped = time.monotonic()
        time.sleep(down_for)
        restarting = time.monotonic()
    finally:
        start_postgres(postgres)
    return stopped, restarting


def start_postgres(postgres: Postgres) -> None:
    # The same options as the fixture's start (see cas_fixtures.postgres).
    options = (f"-p {postgres.port} -k {postgres.socket_dir} -c listen_addresses={HOST} "
               f"-c fsync=off -c max_connections=200")
    postgres.run("pg_ctl", "-D", str(postgres.data_dir), "-l",
                 str(postgres.root / "server.log"), "-o", options, "-w", "-t", "60", "start",
                 timeout=90)


@dataclass
class Readers:
    """Threads reading sessions in a loop; every answer is recorded with when it came."""

    alice: User
    server: CasServer
    names: list[str]
    answers: list[tuple[float, int, str]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def loop(self, index: int) -> None:
        name = self.names[index % len(self.names)]
        with self.alice.http(self.server, timeout=30) as http:
            while not self.stop.is_set():
                try:
                    response = http.get(f"/v1/sessions/{name}")
                except httpx.HTTPError as error:
                    with self.lock:
                        self.errors.append(f"{type(error).__name__}: {error}")
                    time.sleep(0.05)
                    continue
                with self.lock:
                    self.answers.append((time.monotonic(), response.status_code, response.text))
                time.sleep(0.01)

    @contextlib.contextmanager
    def running(self, count: int = 4) -> Iterator[None]:
        threads = [threading.Thread(target=self.loop, args=(i,), daemon=True)
                   for i in range(count)]
        for thread in threads:
            thread.start()
        try:
            yield
        finally:
            self.stop.set()
            for thread in threads:
                thread.join(timeout=60)
            assert not any(thread.is_alive() for thread in threads), "a reader hung"


def check_answers(readers: Readers) -> tuple[int, int]:
    """Every answer is a 200 or a clean 503 naming the database; returns their counts."""
    ok = unavailable = 0
    for _, status, text in readers.answers:
        if status == 200:
            ok += 1
            continue
        assert status == 503, (status, text)
        body = httpx.Response(503, content=text.encode()).json()
        assert set(body) == {"kind", "reason"} and body["kind"] == "unavailable", body
        assert "database" in body["reason"], body
        assert "Traceback" not in body["reason"], body
        unavailable += 1
    assert readers.errors == [], readers.errors[:5]
    return ok, unavailable


@pytest.fixture
def pg_world(cas_server: StartCas, user: MakeUser,
             postgres: Postgres) -> tuple[Postgres, str, CasServer, User, list[str]]:
    url = postgres.create_database()
    server = cas_server(db=url)
    alice = user(unique_name("alice"))
    alice.attest(server)
    names = []
    for _ in range(3):
        doc = SessionDoc(unique_name("read"))
        create(alice, server, doc)
        names.append(doc.name)
    return postgres, url.rsplit("/", 1)[1], server, alice, names


def after_recovery(alice: User, server: CasServer, names: list[str]) -> None:
    """Reads and writes work again without restarting the CAS."""
    deadline = time.monotonic() + 30
    with alice.http(server) as http:
        while True:
            response = http.get(f"/v1/sessions/{names[0]}")
            if response.status_code == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert response.status_code == 200, response.text
        for name in names:
            current = http.get(f"/v1/sessions/{name}")
            assert current.status_code == 200, current.text
            doc = SessionDoc(name, command="/after-outage", predecessor=current.json()["hash"])
            updated = http.put(f"/v1/sessions/{name}", content=doc.body())
            assert updated.status_code == 200, updated.text


@pytest.mark.timeout(120)
def test_terminated_backend_connections_under_read_load(
        pg_world: tuple[Postgres, str, CasServer, User, list[str]]) -> None:
    postgres, dbname, server, alice, names = pg_world
    readers = Readers(alice, server, names)
    with readers.running():
        time.sleep(0.5)
        for _ in range(5):
            psql(postgres, "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                           f"WHERE datname = '{dbname}' AND pid <> pg_backend_pid()")
            time.sleep(0.3)
        time.sleep(0.5)
    ok, _ = check_answers(readers)
    assert ok > 0
    assert server.process is not None and server.process.poll() is None
    after_recovery(alice, server, names)
    assert server.unexpected_failures() == []


@pytest.mark.timeout(120)
def test_postgresql_stopped_and_started_under_read_load(
        pg_world: tuple[Postgres, str, CasServer, User, list[str]]) -> None:
    postgres, _, server, alice, names = pg_world
    readers = Readers(alice, server, names)
    with readers.running():
        time.sleep(0.5)
        stopped, restarting = restart_postgres(postgres, down_for=2.0)
        time.sleep(1.0)
    ok, unavailable = check_answers(readers)
    assert unavailable > 0, "no request was answered while PostgreSQL was down"
    during = [status for at, status, _ in readers.answers if stopped + 0.2 < at < restarting]
    assert during and set(during) == {503}, during
    assert ok > 0
    assert server.process is not None and server.process.poll() is None
    after_recovery(alice, server, names)
    assert server.unexpected_failures() == []

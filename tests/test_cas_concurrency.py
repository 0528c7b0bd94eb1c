"""Concurrent writers on a live CAS: of many updates from one predecessor exactly one wins.

Twenty threads, each with its own TLS connection opened beforehand, release
their requests together through a barrier. Run on SQLite and on a real
PostgreSQL, and on PostgreSQL also across two CAS replicas sharing one database.
"""

from __future__ import annotations

import re
import threading
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from cas_fixtures import (
    CasServer,
    MakeUser,
    Postgres,
    SessionDoc,
    StartCas,
    User,
    unique_name,
)

N = 20
CONTENDER = re.compile(r"/contender-(\d+)\b")


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest, cas_server: StartCas,
            user: MakeUser) -> Iterator[tuple[CasServer, User]]:
    db = None
    if request.param == "postgresql":
        postgres: Postgres = request.getfixturevalue("postgres")
        db = postgres.create_database()
    server = cas_server(db=db)
    alice = user(f"alice-{request.param}")
    alice.attest(server)
    yield server, alice
    server.stop()


def race(alice: User, targets: list[CasServer], method: str, path: str,
         bodies: list[bytes]) -> list[httpx.Response]:
    """Send one request per body, all at once; request i goes to targets[i % len(targets)]."""
    barrier = threading.Barrier(len(bodies))

    def send(index: int) -> httpx.Response:
        server = targets[index % len(targets)]
        with alice.http(server, timeout=120) as http:
            # Connect and finish the TLS handshake first, so the barrier releases requests.
            assert http.get("/v1/health").status_code == 200
            barrier.wait(timeout=60)
            return http.request(method, path, content=bodies[index])

    with ThreadPoolExecutor(max_workers=len(bodies)) as pool:
        return list(pool.map(send, range(len(bodies))))


def create(alice: User, server: CasServer, doc: SessionDoc) -> str:
    with alice.http(server) as http:
        response = http.post("/v1/sessions", content=doc.body())
    assert response.status_code == 201, response.text
    return str(response.json()["hash"])


def check_one_winner(alice: User, server: CasServer, name: str, predecessor: str,
                     responses: list[httpx.Response]) -> None:
    statuses = Counter(response.status_code for response in responses)
    assert statuses == Counter({200: 1, 409: N - 1}), \
        [(r.status_code, r.text) for r in responses]
    winner = next(i for i, r in enumerate(responses) if r.status_code == 200)
    new_hash = responses[winner].json()["hash"]
    for response in responses:
        if response.status_code == 409:
            assert response.json()["kind"] == "conflict", response.text
            reason = response.json()["reason"]
            assert predecessor in reason, reason
            assert "stale predecessor" in reason or "changed concurrently" in reason, reason

    with alice.http(server) as http:
        stored = http.get(f"/v1/sessions/{name}")
        audit = http.get(f"/v1/audit?session={name}")
    assert stored.status_code == 200, stored.text
    assert stored.json()["hash"] == new_hash
    assert {int(n) for n in CONTENDER.findall(stored.json()["session"])} == {winner}

    updates = [e for e in audit.json()["events"] if e["event"] == "session.update"]
    outcomes = Counter(e["outcome"] for e in updates)
    assert outcomes == Counter({"accepted": 1, "refused": N - 1}), updates


def test_twenty_concurrent_updates_from_one_predecessor(backend: tuple[CasServer, User]) -> None:
    server, alice = backend
    base = SessionDoc(unique_name("race"), command="/base")
    predecessor = create(alice, server, base)
    bodies = [SessionDoc(base.name, command=f"/contender-{i}", predecessor=predecessor).body()
              for i in range(N)]
    responses = race(alice, [server], "PUT", f"/v1/sessions/{base.name}", bodies)
    check_one_winner(alice, server, base.name, predecessor, responses)


def test_twenty_concurrent_creates_of_one_name(backend: tuple[CasServer, User]) -> None:
    server, alice = backend
    name = unique_name("create-race")
    bodies = [SessionDoc(name, command=f"/contender-{i}").body() for i in range(N)]
    responses = race(alice, [server], "POST", "/v1/sessions", bodies)
    statuses = Counter(response.status_code for response in responses)
    assert statuses == Counter({201: 1, 409: N - 1}), \
        [(r.status_code, r.text) for r in responses]
    winner = next(i for i, r in enumerate(responses) if r.status_code == 201)
    for response in responses:
        if response.status_code == 409:
            assert response.json()["kind"] == "conflict", response.text
            assert "already exists" in response.json()["reason"], response.text
    with alice.http(server) as http:
        stored = http.get(f"/v1/sessions/{name}").json()
    assert stored["hash"] == responses[winner].json()["hash"]
    assert {int(n) for n in CONTENDER.findall(stored["session"])} == {winner}


def test_concurrent_updates_across_two_replicas_sharing_postgresql(
        cas_server: StartCas, user: MakeUser, postgres: Postgres) -> None:
    url = postgres.create_database()
    first = cas_server(db=url)
    # A replica: same keys and certificate (shared state folder), same database.
    second = cas_server(db=url, state_dir=first.state_dir)
    try:
        assert second.fingerprint == first.fingerprint
        alice = user("alice-replicas")
        alice.attest(first)
        base = SessionDoc(unique_name("replicas"), command="/base")
        predecessor = create(alice, first, base)
        bodies = [SessionDoc(base.name, command=f"/contender-{i}",
                             predecessor=predecessor).body() for i in range(N)]
        responses = race(alice, [first, second], "PUT", f"/v1/sessions/{base.name}", bodies)
        check_one_winner(alice, second, base.name, predecessor, responses)
    finally:
        second.stop()
        first.stop()

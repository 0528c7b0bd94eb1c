"""``tdapp cas serve --workers 2``: two CAS processes on one port and one SQLite database.

Real processes, real TLS, real attestations (sim evidence from a platform the
test holds): many connections land on both workers; a nonce raced on two
connections is spent once; an update made through one worker is what the other
releases next; and a worker killed with SIGKILL under attestation load loses no
attestation it acknowledged (every instance it answered for still has its row),
while the parent starts a new worker on the same port.
"""

from __future__ import annotations

import hashlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from cas_fixtures import MRENCLAVE, CasServer, MakeUser, StartCas, User, unique_name
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tdapp.attest import Workload, report_data
from tdapp.attest.sim import platform_id, sign_evidence
from tdapp.client.key_release import EphemeralKey

PLATFORM = Ed25519PrivateKey.from_private_bytes(
    hashlib.sha256(b"tdapp test_cas_workers platform").digest())
PLATFORM_ID = platform_id(PLATFORM.public_key().public_bytes(
    serialization.Encoding.Raw, serialization.PublicFormat.Raw))
SERVICE = "application"


def session_text(name: str, greeting: str) -> str:
    return yaml.safe_dump({
        "name": name, "version": "0.3",
        "security": {"attestation": {"mode": "sim", "platforms": [PLATFORM_ID]}},
        "services": [{"name": SERVICE, "image_name": "img", "mrenclaves": [MRENCLAVE],
                      "command": "/application", "pwd": "/",
                      "environment": {"GREETING": greeting}}],
        "volumes": [{"name": "out", "fspf_key": "11" * 32, "fspf_tag": "22" * 16}],
        "images": [{"name": "img", "volumes": [{"name": "out", "path": "/out"}]}],
    }, sort_keys=False)


def workers_of(server: CasServer) -> list[int]:
    assert server.process is not None
    pid = server.process.pid
    return [int(child) for child in
            Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


@pytest.fixture(scope="module")
def cas(cas_server: StartCas, user: MakeUser) -> Iterator[tuple[CasServer, User]]:
    server = cas_server(extra=("--debug", "--workers", "2"))
    alice = user(unique_name("alice"))
    alice.attest(server)
    yield server, alice


def create(alice: User, server: CasServer, name: str, greeting: str = "hello") -> str:
    with alice.http(server) as http:
        response = http.post("/v1/sessions", content=session_text(name, greeting).encode())
    assert response.status_code == 201, response.text
    return str(response.json()["hash"])


def nonce(http: httpx.Client, name: str) -> str:
    response = http.post("/v1/attestation/nonce", json={"session": name, "service": SERVICE})
    assert response.status_code == 201, response.text
    return str(response.json()["nonce"])


def attestation_body(name: str, value: str) -> tuple[EphemeralKey, dict[str, Any]]:
    key = EphemeralKey()
    evidence = sign_evidence(PLATFORM, measurement=MRENCLAVE,
                             report_data=report_data(value, key.public_der,
                                                     Workload(MRENCLAVE, name, SERVICE)),
                             debug=False, issued_at=time.time())
    return key, {"session": name, "service": SERVICE, "nonce": value,
                 "public_key": key.public_b64url, "workload": MRENCLAVE, "evidence": evidence}


def test_two_workers_serve_one_port(cas: tuple[CasServer, User]) -> None:
    server, alice = cas
    assert len(workers_of(server)) == 2, server.log()
    assert "2 worker processes" in server.log()
    name = unique_name("w")
    create(alice, server, name)
    for _ in range(12):  # fresh connections: the kernel spreads them over both workers
        with alice.http(server) as http:
            nonce(http, name)
    assert server.unexpected_failures() == []


def test_a_nonce_raced_on_many_connections_is_spent_once(cas: tuple[CasServer, User]) -> None:
    server, alice = cas
    name = unique_name("race")
    create(alice, server, name)
    racers = 6
    with alice.http(server) as http:
        nonces = [nonce(http, name) for _ in range(4)]
    for value in nonces:
        barrier = threading.Barrier(racers)

        def send(_: int, value: str = value, barrier: threading.Barrier = barrier) -> int:
            _, body = attestation_body(name, value)
            with alice.http(server) as http:  # its own connection: either worker
                assert http.get("/v1/health").status_code == 200
                barrier.wait(timeout=30)
                return http.post("/v1/attestation", json=body).status_code

        with ThreadPoolExecutor(racers) as pool:
            statuses = sorted(pool.map(send, range(racers)))
        assert statuses == [200] + [403] * (racers - 1), statuses
    with alice.http(server) as http:
        events = http.get("/v1/audit", params={"session": name}).json()["events"]
    accepted = [e for e in events if e["event"] == "attest" and e["outcome"] == "accepted"]
    assert len(accepted) == len(nonces), accepted


def test_an_update_through_one_worker_is_what_every_worker_releases(
        cas: tuple[CasServer, User]) -> None:
    server, alice = cas
    name = unique_name("upd")
    first = create(alice, server, name, greeting="before")
    for _ in range(4):  # every worker releases (and so caches) the first revision
        with alice.http(server) as http:
            key, body = attestation_body(name, nonce(http, name))
            released = key.open(http.post("/v1/attestation", json=body).json()["jwe"])
        assert released.environment["GREETING"] == "before"
    text = session_text(name, "after").replace("version: '0.3'",
                                               f"version: '0.3'\npredecessor: {first}")
    with alice.http(server) as http:
        assert http.put(f"/v1/sessions/{name}", content=text.encode()).status_code == 200
    for _ in range(8):
        with alice.http(server) as http:
            key, body = attestation_body(name, nonce(http, name))
            answer = http.post("/v1/attestation", json=body)
        assert answer.status_code == 200, answer.text
        assert key.open(answer.json()["jwe"]).environment["GREETING"] == "after"
    with alice.http(server) as http:
        assert http.delete(f"/v1/sessions/{name}").status_code == 200
    for _ in range(4):  # and a deleted session releases nothing, on any worker
        with alice.http(server) as http:
            answer = http.post("/v1/attestation/nonce",
                               json={"session": name, "service": SERVICE})
            if answer.status_code == 201:  # issued from memory: the attestation is refused
                _, body = attestation_body(name, answer.json()["nonce"])
                answer = http.post("/v1/attestation", json=body)
        assert answer.status_code == 404, answer.text


@dataclass
class Attester:
    """Attests in a loop (reconnecting after errors), keeping each token it was given."""

    alice: User
    server: CasServer
    name: str
    tokens: list[str] = field(default_factory=list)
    failures: int = 0

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                with self.alice.http(self.server, timeout=10) as http:
                    while not stop.is_set():
                        key, body = attestation_body(self.name, nonce(http, self.name))
                        answer = http.post("/v1/attestation", json=body)
                        if answer.status_code != 200:
                            self.failures += 1
                            break
                        self.tokens.append(key.open(answer.json()["jwe"]).token
                                           .get_secret_value())
            except (httpx.HTTPError, AssertionError):
                self.failures += 1  # the worker holding this connection died: reconnect


@pytest.mark.timeout(120)
def test_sigkill_of_a_worker_loses_no_acknowledged_attestation(
        cas: tuple[CasServer, User]) -> None:
    server, alice = cas
    name = unique_name("kill")
    create(alice, server, name)
    attesters = [Attester(alice, server, name) for _ in range(6)]
    stop = threading.Event()
    threads = [threading.Thread(target=a.run, args=(stop,), daemon=True) for a in attesters]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60
    while sum(len(a.tokens) for a in attesters) < 20 and time.monotonic() < deadline:
        time.sleep(0.05)
    victim = workers_of(server)[0]
    os.kill(victim, signal.SIGKILL)
    time.sleep(0.5)  # the load goes on over the kill and the restart
    while (victim in workers_of(server) or len(workers_of(server)) < 2) \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    for thread in threads:
        thread.join(timeout=30)
        assert not thread.is_alive(), "an attester hung after the kill"
    assert victim not in workers_of(server) and len(workers_of(server)) == 2, \
        "the parent did not start a new worker"
    tokens = [token for a in attesters for token in a.tokens]
    assert len(tokens) >= 20, "the load did not get going before the kill"
    # Every acknowledged instance has its row: its token is known (an unknown one is 403).
    with alice.http(server) as http:
        for token in tokens:
            answer = http.get("/v1/runs", params={"session": name, "label": "none"},
                              headers={"Authorization": f"Bearer {token}"})
            assert answer.status_code == 404 and "labelled" in answer.text, answer.text
    assert server.unexpected_failures() == []

"""What an anonymous network client can make the CAS, the LAS and the transfer service do.

Real servers in child processes, attacked over real sockets:

* a spent nonce replayed in another spelling (upper case, padded, with a newline,
  base64) is refused and releases no second configuration;
* an anonymous 1 MiB session document costs the CAS no parse (its CPU time, read
  from /proc, barely moves), and of eight anonymous large bodies at once those past
  the per-client bound get 429 with a Retry-After, while a nonce is still issued;
* a bare TCP connection, a connection with half its headers and one with half its
  body are closed by each service within its (small, test-set) timeouts, and the
  transfer service keeps no spool file of the abandoned upload.

Bounds are socket timeouts and pytest's timeout, never measured durations.
"""

from __future__ import annotations

import base64
import json
import os
import select
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from cas_fixtures import (
    MRENCLAVE,
    CasServer,
    MakeUser,
    SessionDoc,
    StartCas,
    User,
    accepts_tcp,
    anonymous_http,
    child_environment,
    free_port,
    unique_name,
)
from test_transfer_service import start_service

from tdapp.client.key_release import EphemeralKey

HOST = "127.0.0.1"
SMALL_TIMEOUT = "1"  # seconds, given to the servers under attack
CLOSE_BOUND = 15.0  # a socket that sees no EOF within this fails the test
MIB = 1024 * 1024


@dataclass
class Cas:
    server: CasServer
    alice: User


@pytest.fixture(scope="module")
def cas(cas_server: StartCas, user: MakeUser) -> Cas:
    """A CAS with its default limits and timeouts, and a certified user."""
    server = cas_server()
    alice = user("alice-limits")
    alice.attest(server)
    return Cas(server, alice)


# -- breach 7: one nonce, one release, whatever its spelling ------------------------------


def _no_evidence_session(cas: Cas) -> str:
    """A session attested without evidence (mode none): the nonce is all its freshness."""
    document = SessionDoc(unique_name("nonce")).as_dict()
    document["security"] = {"attestation": {"mode": "none"}}
    with cas.alice.http(cas.server) as http:
        created = http.post("/v1/sessions", content=json.dumps(document).encode())
    assert created.status_code == 201, created.text
    return str(document["name"])


def _attest(cas: Cas, session: str, nonce: str, key: EphemeralKey) -> httpx.Response:
    with anonymous_http(cas.server) as http:
        return http.post("/v1/attestation", json={
            "session": session, "service": "application", "nonce": nonce,
            "public_key": key.public_b64url, "workload": MRENCLAVE, "evidence": None})


def _audit(cas: Cas, session: str) -> list[dict[str, Any]]:
    with cas.alice.http(cas.server) as http:
        answer = http.get("/v1/audit", params={"session": session})
    assert answer.status_code == 200, answer.text
    events: list[dict[str, Any]] = answer.json()["events"]
    return events


def _respellings(nonce: str) -> dict[str, str]:
    raw = bytes.fromhex(nonce)
    return {
        "upper case": nonce.upper(),
        "one letter upper case": next(nonce[:i] + c.upper() + nonce[i + 1:]
                                      for i, c in enumerate(nonce) if c.isalpha()),
        "space padded": f" {nonce} ",
        "space inside": f"{nonce[:2]} {nonce[2:]}",
        "trailing newline": nonce + "\n",
        "tab padded": f"\t{nonce}",
        "base64": base64.b64encode(raw).decode(),
        "base64url": base64.urlsafe_b64encode(raw).decode().rstrip("="),
    }


def test_a_spent_nonce_in_another_spelling_releases_nothing(cas: Cas) -> None:
    session = _no_evidence_session(cas)
    with anonymous_http(cas.server) as http:
        issued = http.post("/v1/attestation/nonce",
                           json={"session": session, "service": "application"})
    assert issued.status_code == 201, issued.text
    nonce = issued.json()["nonce"]
    first = _attest(cas, session, nonce, EphemeralKey())
    assert first.status_code == 200 and "jwe" in first.json(), first.text

    for spelling, replay in _respellings(nonce).items():
        answer = _attest(cas, session, replay, EphemeralKey())
        assert answer.status_code == 403, (spelling, answer.status_code, answer.text)
        assert "jwe" not in answer.text, f"{spelling}: a second configuration was released"
    events = _audit(cas, session)
    released = [e for e in events if e["event"] == "attest" and e["outcome"] == "accepted"]
    assert len(released) == 1, released
    refusals = [e for e in events if e["event"] == "attest" and e["outcome"] == "refused"]
    assert len(refusals) == len(_respellings(nonce)), refusals
    assert all("nonce" in e["reason"] for e in refusals), refusals


# -- breach 8: anonymous callers make the CAS parse ---------------------------------------


def _cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process (all its threads), from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15 of stat(5)
    return ticks / os.sysconf("SC_CLK_TCK")


def _costly_document() -> bytes:
    """Just under 1 MiB of YAML that takes the session parser seconds of CPU."""
    head, tail = b"name: costly\nlist: [", b"1]\n"
    return head + b"1," * ((MIB - len(head) - len(tail)) // 2) + tail


def test_an_anonymous_document_is_refused_unparsed(cas: Cas) -> None:
    document = _costly_document()
    assert len(document) <= MIB
    assert cas.server.process is not None
    pid = cas.server.process.pid
    before = _cpu_seconds(pid)
    with anonymous_http(cas.server, timeout=60) as http:
        answers = [http.post("/v1/sessions", content=document),
                   http.post("/session", content=document),
                   http.put("/v1/sessions/costly", content=document)]
    spent = _cpu_seconds(pid) - before
    # Parsing one such document costs about 3 s of CPU; three refusals cost TLS
    # handshakes and discarded bytes.
    assert spent < 1.5, f"the CAS spent {spent:.2f} s of CPU on three anonymous documents"
    for answer in answers:
        assert answer.status_code == 401, (answer.status_code, answer.text)
        assert answer.json()["kind"] == "authentication_required", answer.text
        assert "client certificate" in answer.json()["reason"]


def _tls_connection(server: CasServer) -> ssl.SSLSocket:
    context = ssl.create_default_context(cafile=str(server.cert_path))
    raw = socket.create_connection((server.host, server.port), timeout=CLOSE_BOUND)
    return context.wrap_socket(raw, server_hostname=server.host)


def _half_sent(server: CasServer, path: str, length: int) -> ssl.SSLSocket:
    """A request whose headers are complete and whose body is sent only in part."""
    connection = _tls_connection(server)
    connection.sendall(f"POST {path} HTTP/1.1\r\nHost: {server.host}\r\n"
                       f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
                       .encode() + b'{"session": "' + b"x" * 512)
    return connection


def test_eight_anonymous_large_bodies_get_429_and_nonces_are_still_issued(cas: Cas) -> None:
    session = _no_evidence_session(cas)
    held = [_half_sent(cas.server, "/v1/attestation", 200_000) for _ in range(4)]
    held += [_half_sent(cas.server, "/v1/identities", 12_000) for _ in range(4)]
    answered: dict[ssl.SSLSocket, bytes] = {}
    try:
        deadline = time.monotonic() + CLOSE_BOUND
        # Per client address two may be in progress and, without an identity, two wait.
        while len(answered) < 4:
            waiting = [c for c in held if c not in answered]
            ready, _, _ = select.select(waiting, [], [], max(0.0, deadline - time.monotonic()))
            assert ready, (f"only {len(answered)} of eight concurrent anonymous bodies were "
                           "refused; the others occupy the CAS")
            for connection in ready:
                # Readable may be only a TLS session ticket: read without blocking.
                connection.setblocking(False)
                try:
                    answered[connection] = connection.recv(65536)
                except ssl.SSLWantReadError:
                    continue
        for head in answered.values():
            status_line, _, rest = head.partition(b"\r\n")
            assert status_line.split()[1] == b"429", head
            assert b"\r\nretry-after: " in b"\r\n" + rest.lower(), head
        # With two bodies still held open by this address, a nonce is issued.
        with anonymous_http(cas.server) as http:
            issued = http.post("/v1/attestation/nonce",
                               json={"session": session, "service": "application"})
        assert issued.status_code == 201, issued.text
    finally:
        for connection in held:
            connection.close()


def test_anonymous_endpoints_take_only_small_bodies(cas: Cas) -> None:
    assert cas.server.process is not None
    pid = cas.server.process.pid
    before = _cpu_seconds(pid)
    big = b'{"session": "' + b"x" * (MIB - 100) + b'"}'
    with anonymous_http(cas.server, timeout=60) as http:
        for path in ("/v1/attestation/nonce", "/v1/attestation", "/v1/identities"):
            answer = http.post(path, content=big)
            assert answer.status_code == 413, (path, answer.text)
            assert answer.json()["kind"] == "too_large", answer.text
            assert "larger than" in answer.json()["reason"]
    assert _cpu_seconds(pid) - before < 1.5


# -- breach 9: connections that stop sending -----------------------------------------------


def _assert_closed(connection: socket.socket, what: str) -> bytes:
    """Read until the server closes; a socket timeout here means it never did."""
    connection.settimeout(CLOSE_BOUND)
    received = b""
    try:
        while chunk := connection.recv(65536):
            received += chunk
    except (ConnectionResetError, ssl.SSLEOFError, ssl.SSLZeroReturnError):
        pass
    except TimeoutError:
        pytest.fail(f"{what}: the server kept the connection open")
    return received


def _tcp(port: int) -> socket.socket:
    return socket.create_connection((HOST, port), timeout=CLOSE_BOUND)


@pytest.fixture(scope="module")
def impatient_cas(cas_server: StartCas) -> CasServer:
    return cas_server(extra=("--header-timeout", SMALL_TIMEOUT, "--body-timeout", SMALL_TIMEOUT))


@pytest.mark.timeout(60)
def test_the_cas_closes_connections_that_stop_sending(impatient_cas: CasServer) -> None:
    server = impatient_cas
    with _tcp(server.port) as bare:  # never starts TLS
        _assert_closed(bare, "a bare TCP connection")
    with _tls_connection(server) as half_headers:
        half_headers.sendall(b"POST /v1/sessions HTTP/1.1\r\nHost: cas\r\nContent-Le")
        _assert_closed(half_headers, "a request with half its headers")
    with _half_sent(server, "/v1/attestation/nonce", 4000) as half_body:
        answer = _assert_closed(half_body, "a request with half its body")
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert server.unexpected_failures() == []
    with anonymous_http(server) as http:
        assert http.get("/v1/health").status_code == 200


@pytest.fixture(scope="module")
def impatient_las(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    root = tmp_path_factory.mktemp("las-impatient")
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "tdapp", "las", "serve", "--port", str(port),
         "--state-dir", str(root / "state"), "--header-timeout", SMALL_TIMEOUT,
         "--body-timeout", SMALL_TIMEOUT],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env=child_environment(root), start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not accepts_tcp(HOST, port):
            assert process.poll() is None and time.monotonic() < deadline, "LAS did not start"
            time.sleep(0.1)
        yield port
    finally:
        process.terminate()
        process.wait(timeout=15)


def _plain_attacks(port: int, path: str) -> bytes:
    """Bare connection, half headers, half body against a plain-HTTP service."""
    with _tcp(port) as bare:
        _assert_closed(bare, "a bare TCP connection")
    with _tcp(port) as half_headers:
        half_headers.sendall(f"POST {path} HTTP/1.1\r\nHost: h\r\nContent-Le".encode())
        _assert_closed(half_headers, "a request with half its headers")
    with _tcp(port) as half_body:
        half_body.sendall(f"POST {path} HTTP/1.1\r\nHost: h\r\nContent-Length: 2000\r\n\r\n"
                          .encode() + b"x" * 100)
        return _assert_closed(half_body, "a request with half its body")


@pytest.mark.timeout(60)
def test_the_las_closes_connections_that_stop_sending(impatient_las: int) -> None:
    answer = _plain_attacks(impatient_las, "/v1/evidence")
    assert answer.startswith(b"HTTP/1.1 408"), answer
    platform = httpx.get(f"http://{HOST}:{impatient_las}/v1/platform", timeout=10)
    assert platform.status_code == 200


@pytest.mark.timeout(60)
def test_the_transfer_service_closes_stalled_uploads_and_keeps_nothing(tmp_path: Path) -> None:
    service = start_service(tmp_path / "home", "--header-timeout", SMALL_TIMEOUT,
                            "--body-timeout", SMALL_TIMEOUT)
    spool = tmp_path / "home" / "transfer" / "spool"
    try:
        answer = _plain_attacks(service.port, "/upload?name=a.zip")
        assert answer.startswith(b"HTTP/1.1 408"), answer
        # A stalled upload is spooled while it lasts, and its spool file goes with it.
        with _tcp(service.port) as stalled:
            stalled.sendall(b"POST /upload?name=b.zip HTTP/1.1\r\nHost: h\r\n"
                            b"Content-Length: 1000000\r\n\r\n" + os.urandom(70_000))
            _wait_until(lambda: spool.is_dir() and any(spool.iterdir()),
                        "the upload was never spooled")
            answer = _assert_closed(stalled, "a stalled upload")
        assert answer.startswith(b"HTTP/1.1 408"), answer
        assert list(spool.iterdir()) == []
        assert not any((tmp_path / "home" / "transfer").glob("objects/*/*"))
    finally:
        service.stop()


def _wait_until(condition: Any, failure: str) -> None:
    deadline = time.monotonic() + CLOSE_BOUND
    while not condition():
        assert time.monotonic() < deadline, failure
        time.sleep(0.05)

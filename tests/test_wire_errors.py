"""One error body on the wire: every service answers ``{"kind", "reason"}`` and nothing else.

Real servers: a CAS (``tdapp cas serve`` in a child process), a LAS (its
application on loopback in a thread) and a transfer service (``tdapp transfer
serve``). For each, bad requests of several kinds must get exactly the body
``{"kind", "reason"}`` with the status of the kind, never a text page, a bare
``error`` field or a traceback; and the tdapp client of each service must raise
the exception class of the kind, so that what a program acts on is the kind,
never the wording of a reason.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from aiohttp import web
from cas_fixtures import (
    MRENCLAVE,
    CasServer,
    MakeUser,
    SessionDoc,
    StartCas,
    User,
    anonymous_http,
    unique_name,
)
from cryptography import x509
from test_attest_las import running
from test_transfer_service import Service, no_progress, random_file, start_service

from tdapp.attest.las import LasClient, build_las_app
from tdapp.client.cas_client import CasClient
from tdapp.core.address import Address
from tdapp.errors import (
    AuthenticationRequired,
    ConflictError,
    ErrorKind,
    InputError,
    NotFoundError,
    RefusedError,
    TooLargeError,
    UnavailableError,
    UsageError,
    error_class,
    error_for,
)
from tdapp.serving import TIMEOUTS, ServerTimeouts
from tdapp.tls import new_private_key, self_signed
from tdapp.transfer import download, upload


def assert_error(response: httpx.Response, status: int, kind: ErrorKind) -> str:
    """The answer is exactly ``{kind, reason}`` with ``status``; returns the reason."""
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body = response.json()
    assert isinstance(body, dict) and set(body) == {"kind", "reason"}, body
    assert body["kind"] == kind, body
    reason = body["reason"]
    assert isinstance(reason, str) and reason.strip() and "\n" not in reason, body
    assert "Traceback" not in reason, body
    return reason


# -- the vocabulary ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(ErrorKind))
def test_every_kind_has_one_class_and_a_client_maps_it_back(kind: ErrorKind) -> None:
    """Attacks the tables drifting apart: the class a service raises for a kind must
    carry that kind, and a client must raise that class (an internal failure of a
    service is its unavailability to the client)."""
    raised = error_class(kind)
    assert raised.kind is kind
    assert 400 <= raised.http_status < 600
    expected = UnavailableError if kind is ErrorKind.INTERNAL else raised
    assert error_for(str(kind)) is expected


@pytest.mark.parametrize("kind", ["", "teapot", "NOT_FOUND", "error"])
def test_a_kind_a_client_does_not_know_is_unavailability(kind: str) -> None:
    """A newer service or a proxy names a kind this client does not know: what must not
    happen is the client guessing that the caller did something wrong."""
    assert error_for(kind) is UnavailableError


# -- the CAS ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cas(cas_server: StartCas, user: MakeUser) -> tuple[CasServer, User]:
    server = cas_server()
    alice = user("alice-wire")
    alice.attest(server)
    return server, alice


def cas_client(server: CasServer, who: User | None, monkeypatch: pytest.MonkeyPatch
               ) -> CasClient:
    """The CasClient ``who`` uses (their pin and certified identity), or an anonymous one."""
    if who is None:
        pinned = x509.load_pem_x509_certificate(server.cert_path.read_bytes())
        return CasClient(Address.parse(server.address), pinned, None)
    monkeypatch.setenv("TDAPP_HOME", str(who.home))
    return CasClient.connect(Address.parse(server.address))


def no_evidence_session(server: CasServer, alice: User) -> str:
    """A session attested without evidence (mode none), created by ``alice``."""
    document = SessionDoc(unique_name("wire")).as_dict()
    document["security"] = {"attestation": {"mode": "none"}}
    with alice.http(server) as http:
        created = http.post("/v1/sessions", content=json.dumps(document).encode())
    assert created.status_code == 201, created.text
    return str(document["name"])


def test_cas_bodies(cas: tuple[CasServer, User]) -> None:
    """Attacks the CAS with one bad request of each kind it answers for a request: each
    gets exactly ``{kind, reason}`` with its status."""
    server, alice = cas
    taken = SessionDoc(unique_name("taken"))
    with alice.http(server) as http:
        assert http.post("/v1/sessions", content=taken.body()).status_code == 201
        assert "already exists" in assert_error(
            http.post("/v1/sessions", content=taken.body()), 409, ErrorKind.CONFLICT)
        assert "no session named" in assert_error(
            http.get("/v1/sessions/nobody-here"), 404, ErrorKind.NOT_FOUND)
        assert_error(http.post("/v1/sessions", content=b"name: [unclosed"), 400,
                     ErrorKind.INPUT)
        assert_error(http.get("/v1/nothing"), 404, ErrorKind.NOT_FOUND)
        assert_error(http.patch(f"/v1/sessions/{taken.name}"), 405, ErrorKind.USAGE)
    with anonymous_http(server) as http:
        assert "client certificate" in assert_error(
            http.post("/v1/sessions", content=taken.body()), 401,
            ErrorKind.AUTHENTICATION_REQUIRED)
        assert "larger than" in assert_error(
            http.post("/v1/attestation/nonce", content=b"{" + b" " * 5000 + b"}"), 413,
            ErrorKind.TOO_LARGE)
        session = no_evidence_session(server, alice)
        assert "nonce" in assert_error(http.post("/v1/attestation", json={
            "session": session, "service": "application", "nonce": "00" * 40,
            "public_key": "AA", "workload": MRENCLAVE, "evidence": None}), 403, ErrorKind.REFUSED)


def test_the_cas_client_raises_the_class_of_each_kind(
        cas: tuple[CasServer, User], monkeypatch: pytest.MonkeyPatch) -> None:
    """Attacks the client side: what the CAS answered must come back as the exception of
    its kind (not as whatever a status table once said), with the CAS's reason."""
    server, alice = cas
    anonymous = cas_client(server, None, monkeypatch)
    session = no_evidence_session(server, alice)
    with pytest.raises(RefusedError, match=r"refused \(403\): .*nonce") as refused:
        anonymous.request_json("POST", "/v1/attestation", {
            "session": session, "service": "application", "nonce": "00" * 40,
            "public_key": "AA", "workload": MRENCLAVE, "evidence": None})
    assert type(refused.value) is RefusedError
    with pytest.raises(AuthenticationRequired, match=r"refused \(401\): a client certificate"):
        anonymous.request("GET", f"/v1/sessions/{session}")
    with pytest.raises(TooLargeError, match=r"refused \(413\)"):
        anonymous.request_json("POST", "/v1/attestation/nonce", {"session": "x" * 5000})

    client = cas_client(server, alice, monkeypatch)
    with pytest.raises(NotFoundError, match="no session named 'nobody-here'"):
        client.request("GET", "/v1/sessions/nobody-here")
    doc = SessionDoc(unique_name("twice"))
    client.request("POST", "/v1/sessions", doc.body())
    with pytest.raises(ConflictError, match="already exists"):
        client.request("POST", "/v1/sessions", doc.body())
    with pytest.raises(InputError) as malformed:
        client.request("POST", "/v1/sessions", b"name: [unclosed")
    assert type(malformed.value) is InputError
    with pytest.raises(UsageError, match=r"refused \(405\)"):
        client.request("PATCH", f"/v1/sessions/{doc.name}")


def test_a_cas_with_another_certificate_is_refused_before_anything_is_sent(
        cas: tuple[CasServer, User]) -> None:
    """Attacks the pin: a client whose pinned certificate is not the one the CAS presents
    must refuse to talk to it, recognised from the TLS verification failure itself (not
    the words of its message), naming both fingerprints."""
    server, _ = cas
    other = self_signed(new_private_key(), "not the CAS", hosts=["127.0.0.1"])
    client = CasClient(Address.parse(server.address), other, None)
    with pytest.raises(RefusedError, match=r"presented certificate [0-9a-f]{64}, not the "
                                           r"pinned [0-9a-f]{64}") as refused:
        client.request("GET", "/v1/health")
    assert type(refused.value) is RefusedError
    assert server.fingerprint in str(refused.value)


def test_an_unreachable_cas_is_unavailable_not_refused(tmp_path: Path) -> None:
    """A connection that fails for another reason than the certificate (nothing listens)
    must not be taken for a pin mismatch."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    other = self_signed(new_private_key(), "nobody", hosts=["127.0.0.1"])
    client = CasClient(Address("127.0.0.1", port), other, None)
    with pytest.raises(UnavailableError, match="cannot reach the CAS"):
        client.request("GET", "/v1/health")


# -- the LAS ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def las(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    app = build_las_app(tmp_path_factory.mktemp("las-wire"))
    app[TIMEOUTS] = ServerTimeouts(header=5, body=0.5)
    with running(app) as address:
        yield address


def raw_answer(host: str, port: int, request: bytes) -> httpx.Response:
    """Send ``request`` as is and read until the server closes; the answer it sent."""
    with socket.create_connection((host, port), timeout=15) as sock:
        sock.sendall(request)
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except ConnectionResetError:
            pass
    head, _, body = received.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return httpx.Response(int(lines[0].split()[1]), headers=headers, content=body)


def test_las_bodies(las: str, tmp_path: Path) -> None:
    """Attacks the LAS with bad requests of several kinds, a stalled body among them:
    each gets exactly ``{kind, reason}`` with its status."""
    base = f"http://{las}"
    assert assert_error(httpx.post(f"{base}/v1/evidence", json={}), 400,
                        ErrorKind.INPUT) == "report_data is missing"
    assert_error(httpx.post(f"{base}/v1/evidence", content=b" " * 10_000), 413,
                 ErrorKind.TOO_LARGE)
    assert_error(httpx.get(f"{base}/v1/nothing"), 404, ErrorKind.NOT_FOUND)
    assert_error(httpx.get(f"{base}/v1/evidence"), 405, ErrorKind.USAGE)
    host, _, port = las.rpartition(":")
    stalled = raw_answer(host, int(port), b"POST /v1/evidence HTTP/1.1\r\nHost: las\r\n"
                                          b"Content-Length: 2000\r\n\r\n" + b" " * 100)
    assert "stalled" in assert_error(stalled, 408, ErrorKind.TIMEOUT)
    # Another uid's LAS: the caller's socket is not of the uid it serves.
    with running(build_las_app(tmp_path, serve_uid=os.geteuid() + 1)) as foreign:
        assert "answers only uid" in assert_error(
            httpx.get(f"http://{foreign}/v1/platform"), 403, ErrorKind.REFUSED)
        with pytest.raises(RefusedError, match=r"refused the request \(HTTP 403\)"):
            LasClient(foreign).platform()


def test_the_las_client_raises_refused_for_a_request_the_las_will_not_answer(
        las: str) -> None:
    """A LAS refusing bad fields is a refusal of the runtime asking it (RefusedError),
    whatever kind of input was wrong; the kind decides, not the status."""
    with pytest.raises(RefusedError, match=r"\(HTTP 400\): measurement must be 64 hex"):
        LasClient(las).evidence(b"\x01" * 64, "not hex")


# -- the transfer service -----------------------------------------------------------------

LIMIT = 1000


@pytest.fixture(scope="module")
def transfer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    running_service = start_service(tmp_path_factory.mktemp("transfer-wire"), "--max-size",
                                    str(LIMIT), "--body-timeout", "1")
    yield running_service
    running_service.stop()


def test_transfer_bodies(transfer: Service) -> None:
    """Attacks the transfer service with bad uploads and downloads of several kinds: each
    gets exactly ``{kind, reason}`` with its status; a successful upload still answers
    its URL as one line of text."""
    base = transfer.base
    assert assert_error(httpx.post(transfer.upload_url, data={"only": "fields"},
                                   files={"x": (None, b"not a file")}), 400,
                        ErrorKind.INPUT) == "the multipart body has no file part"
    assert_error(httpx.post(transfer.upload_url, content=b"no parts",
                            headers={"Content-Type": "multipart/form-data; boundary=XX"}),
                 400, ErrorKind.INPUT)
    assert f"limit of {LIMIT} bytes" in assert_error(
        httpx.post(transfer.upload_url, content=b"x" * (LIMIT + 1)), 413, ErrorKind.TOO_LARGE)
    assert assert_error(httpx.get(f"{base}/d/AAAAAAAAAAAAAAAAAAAAAA/x.zip"), 404,
                        ErrorKind.NOT_FOUND) == "no such download"
    assert_error(httpx.get(f"{base}/nothing"), 404, ErrorKind.NOT_FOUND)
    assert_error(httpx.get(transfer.upload_url), 405, ErrorKind.USAGE)
    stalled = raw_answer("127.0.0.1", transfer.port,
                         b"POST /upload?name=s.bin HTTP/1.1\r\nHost: t\r\n"
                         b"Content-Length: 900\r\n\r\n" + b"s" * 100)
    assert "upload incomplete" in assert_error(stalled, 408, ErrorKind.TIMEOUT)
    ok = httpx.post(transfer.upload_url, content=b"fine", params={"name": "ok.txt"})
    assert ok.status_code == 200 and ok.headers["content-type"].startswith("text/plain")
    assert ok.text.strip().startswith(base) and ok.text.count("\n") == 1


def test_the_transfer_client_raises_the_class_of_each_kind(transfer: Service,
                                                           tmp_path: Path) -> None:
    """Attacks the transfer client: a refusal must come back as the class of its kind,
    and a failed download must leave nothing behind."""
    with pytest.raises(TooLargeError, match=r"failed: 413 upload larger than the limit"):
        upload(random_file(tmp_path, "big.bin", LIMIT + 1), transfer.upload_url,
               progress=no_progress)
    target = tmp_path / "out.zip"
    with pytest.raises(NotFoundError, match=r"failed: 404 no such download"):
        download(f"{transfer.base}/d/AAAAAAAAAAAAAAAAAAAAAA/x.zip", target,
                 progress=no_progress)
    assert not target.exists()


def test_an_answer_without_a_kind_goes_by_its_status(tmp_path: Path) -> None:
    """An upload or download URL served by something else than a transfer service (a
    plain aiohttp server here) answers text without a kind: what must not happen is the
    client inventing a kind for it; it goes by the status, as before kinds existed."""

    async def bad_gateway(request: web.Request) -> web.Response:
        raise web.HTTPBadGateway()

    other = web.Application()
    other.router.add_get("/gateway", bad_gateway)
    with running(other) as address:
        with pytest.raises(InputError, match=r"failed: 404 404: Not Found") as missing:
            download(f"http://{address}/d/x/y.zip", tmp_path / "y.zip", progress=no_progress)
        assert type(missing.value) is InputError
        with pytest.raises(UnavailableError, match=r"failed: 502") as failed:
            download(f"http://{address}/gateway", tmp_path / "y.zip", progress=no_progress)
        assert type(failed.value) is UnavailableError
    assert list(tmp_path.iterdir()) == []

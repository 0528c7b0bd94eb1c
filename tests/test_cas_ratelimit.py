"""Request rate limits: a client over its rate is refused with 429, others are not; the
CAS client waits and retries what the CAS refused as overloaded, a bounded number of times."""

from __future__ import annotations

import contextlib
import re
import select
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from cas_fixtures import MRENCLAVE, CasServer, StartCas, anonymous_http, unique_name
from cryptography import x509

from tdapp.cas.ratelimit import RateLimit
from tdapp.client.cas_client import MAX_ATTEMPTS, CasClient, _retry_wait
from tdapp.core.address import Address
from tdapp.errors import NotFoundError, OverloadedError


def test_token_bucket_allows_the_burst_then_the_rate() -> None:
    limit = RateLimit(per_second=10, burst=3)
    assert [limit.allow("a", now=0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limit.allow("a", now=0.0) > 0  # the burst is spent
    assert limit.allow("b", now=0.0) == 0.0  # another client has its own bucket
    assert limit.allow("a", now=0.1) == 0.0  # 0.1 s at 10/s refills one token


def test_a_flooding_client_gets_429_with_a_reason(cas_server: StartCas) -> None:
    server = cas_server(extra=("--rate-limit", "2"))
    with anonymous_http(server) as http:
        answers = [http.get("/v1/health") for _ in range(12)]
    limited = [a for a in answers if a.status_code == 429]
    assert answers[0].status_code == 200 and limited
    assert limited[0].json()["kind"] == "overloaded"
    assert "too many requests" in limited[0].json()["reason"]
    assert int(limited[0].headers["Retry-After"]) >= 1


# -- the CAS client retries what the CAS refused before doing any work --------------------

OVERLOADED_429 = re.compile(
    r'^tdapp_cas_requests_total\{method="POST",route="/v1/attestation",status="429"\} (\S+)$',
    re.MULTILINE)
NOT_FOUND_404 = re.compile(
    r'^tdapp_cas_requests_total\{method="POST",route="/v1/attestation",status="404"\} (\S+)$',
    re.MULTILINE)
HELD_LENGTH = 12_000  # over the 8 KiB a body may have to skip the work-slot queue


def _count(server: CasServer, pattern: re.Pattern[str]) -> int:
    """How many answers the CAS's own metrics count for ``pattern``."""
    with anonymous_http(server) as http:
        metrics = http.get("/metrics")
    assert metrics.status_code == 200, metrics.text
    found = pattern.search(metrics.text)
    return int(float(found.group(1))) if found else 0


def _half_sent(server: CasServer) -> ssl.SSLSocket:
    """An anonymous certificate request whose body never arrives: it holds a work slot."""
    context = ssl.create_default_context(cafile=str(server.cert_path))
    raw = socket.create_connection((server.host, server.port), timeout=15)
    connection = context.wrap_socket(raw, server_hostname=server.host)
    connection.sendall(f"POST /v1/identities HTTP/1.1\r\nHost: {server.host}\r\n"
                       f"Content-Length: {HELD_LENGTH}\r\n\r\n".encode() + b"-" * 100)
    return connection


@contextlib.contextmanager
def _slots_held(server: CasServer) -> Iterator[list[ssl.SSLSocket]]:
    """This address's work slots and its anonymous queue, all taken by stalled bodies.

    Five stalled bodies: two in progress and two waiting is all an anonymous address
    may have, so one is refused with 429; once it is, the other four hold everything.
    """
    held = [_half_sent(server) for _ in range(5)]
    try:
        refused: ssl.SSLSocket | None = None
        deadline = time.monotonic() + 15
        while refused is None:
            ready, _, _ = select.select(held, [], [], max(0.0, deadline - time.monotonic()))
            assert ready, "none of five stalled anonymous bodies was refused"
            for connection in ready:
                connection.setblocking(False)
                try:  # readable may be only a TLS session ticket
                    head = connection.recv(65536)
                except ssl.SSLWantReadError:
                    continue
                assert head.startswith(b"HTTP/1.1 429"), head
                refused = connection
        held.remove(refused)
        refused.close()
        yield held
    finally:
        for connection in held:
            connection.close()


def _runtime(server: CasServer) -> CasClient:
    """A client as a runtime has one: the pinned certificate, no identity (anonymous)."""
    pinned = x509.load_pem_x509_certificate(server.cert_path.read_bytes())
    return CasClient(Address.parse(server.address), pinned, None)


def _large_attestation() -> dict[str, Any]:
    """An attestation request for no session, large enough to need a work slot."""
    return {"session": unique_name("nobody"), "service": "application", "nonce": "00",
            "public_key": "AA", "workload": MRENCLAVE, "evidence": {"padding": "x" * HELD_LENGTH}}


def test_an_overloaded_refusal_is_retried_and_the_retry_is_judged(
        cas_server: StartCas) -> None:
    """A CAS too busy for this address answers 429 overloaded, having done nothing. What
    must not happen: the client giving up at once, so that a runtime fails on a busy
    CAS; its retry, once the slots are free, is judged (here: no such session)."""
    server = cas_server()
    outcome: list[BaseException | None] = []

    def attest() -> None:
        try:
            _runtime(server).request_json("POST", "/v1/attestation", _large_attestation())
        except BaseException as error:  # whatever it is, the test thread judges it
            outcome.append(error)
        else:
            outcome.append(None)

    before, judged = _count(server, OVERLOADED_429), _count(server, NOT_FOUND_404)
    with _slots_held(server):
        attempt = threading.Thread(target=attest)
        attempt.start()
        deadline = time.monotonic() + 15
        while _count(server, OVERLOADED_429) == before:
            assert time.monotonic() < deadline and attempt.is_alive(), \
                "the client's first attempt was not refused as overloaded"
            time.sleep(0.02)
    # The slots are free again: the client's next attempt gets a slot.
    attempt.join(timeout=60)
    assert not attempt.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], NotFoundError), outcome
    assert "no session named" in str(outcome[0])
    assert _count(server, NOT_FOUND_404) == judged + 1


def test_the_client_gives_up_after_three_attempts(cas_server: StartCas) -> None:
    """While the CAS stays overloaded, the client sends the request three times in all
    and then fails with the CAS's reason. What must not happen: retrying without end."""
    server = cas_server()
    before = _count(server, OVERLOADED_429)
    with _slots_held(server), pytest.raises(OverloadedError, match=r"refused \(429\): too "
                                                                   "many requests in progress"):
        _runtime(server).request_json("POST", "/v1/attestation", _large_attestation())
    assert _count(server, OVERLOADED_429) == before + MAX_ATTEMPTS


def _answer(status: int, body: dict[str, str] | str, retry_after: str | None
            ) -> httpx.Response:
    headers = {} if retry_after is None else {"Retry-After": retry_after}
    if isinstance(body, str):
        return httpx.Response(status, headers=headers, text=body)
    return httpx.Response(status, headers=headers, json=body)


OVERLOADED = {"kind": "overloaded", "reason": "too many requests"}
DOWN = {"kind": "unavailable", "reason": "the database is unavailable"}


@pytest.mark.parametrize(("method", "path", "answer", "wait"), [
    ("POST", "/v1/sessions", _answer(429, OVERLOADED, "1"), 1.0),
    ("POST", "/v1/attestation", _answer(503, OVERLOADED, "2"), 2.0),
    ("GET", "/v1/health", _answer(503, "<html>busy</html>", "3"), 3.0),
    ("POST", "/v1/attestation/nonce", _answer(503, "<html>busy</html>", "1"), 1.0),
    ("GET", "/v1/audit?session=s", _answer(429, OVERLOADED, "3600"), 10.0),
    # Not refused as overloaded by the CAS: a POST may have been done.
    ("POST", "/v1/sessions", _answer(503, "<html>busy</html>", "1"), None),
    ("PUT", "/v1/volume-tags", _answer(503, DOWN, "1"), None),
    # No delay in seconds, or not an overload status.
    ("GET", "/v1/health", _answer(503, OVERLOADED, None), None),
    ("GET", "/v1/health", _answer(503, OVERLOADED, "Wed, 21 Oct 2015 07:28:00 GMT"), None),
    ("GET", "/v1/health", _answer(500, OVERLOADED, "1"), None),
])
def test_which_refusals_are_retried(method: str, path: str, answer: httpx.Response,
                                    wait: float | None) -> None:
    """Only an overload refusal with a Retry-After is repeated, only when repeating cannot
    do anything twice, and never after more than 10 s. What must not happen: a POST that
    a proxy may have forwarded being sent again."""
    assert _retry_wait(method, path, answer) == wait

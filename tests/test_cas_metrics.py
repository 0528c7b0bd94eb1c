"""The CAS's /metrics: requests by route and status, and refusals by a bounded reason."""

from __future__ import annotations

import re

from cas_fixtures import MakeUser, StartCas, anonymous_http, unique_name

from tdapp.cas.metrics import reason_class


def test_requests_and_refusals_are_counted_without_names_or_hashes(
        cas_server: StartCas, user: MakeUser) -> None:
    server = cas_server()
    alice = user("alice")
    alice.attest(server)
    secret_name = unique_name("hidden")
    with alice.http(server) as http:
        assert http.get(f"/v1/sessions/{secret_name}").status_code == 404
    with anonymous_http(server) as http:
        assert http.get(f"/v1/sessions/{secret_name}").status_code == 401
        text = http.get("/metrics").text
    assert re.search(r'tdapp_cas_requests_total\{method="GET",route="/v1/sessions/\{name\}",'
                     r'status="404"\} 1\.0', text), text
    assert 'tdapp_cas_refusals_total{event="session.read",reason="a client certificate is ' \
           'required (run: tdapp cas attest HOST:PORT)"} 1.0' in text
    assert "tdapp_cas_request_seconds_bucket" in text
    assert secret_name not in text


def test_reason_labels_fold_out_hashes_and_names() -> None:
    reason = (f"stale predecessor {'ab' * 32}: session 'mine' is now at {'cd' * 32}; "
              "read it again")
    assert reason_class(reason) == "stale predecessor …: session '…' is now at …; read it again"

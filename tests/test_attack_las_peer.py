"""Attack: another local user asks the LAS to sign evidence for a session's measurement.

A simulated LAS signs whatever it is asked, so the only thing between another
user of this host and sim evidence for someone else's DApp is who the LAS
answers. It answers connections whose socket the uid running it owns; the test
runs ``curl`` as ``nobody`` (uid 65534) against a real LAS on loopback, over
IPv4 and IPv6, and asserts no evidence came back. The same request from the
LAS's own uid is answered, and ``unsafe_any_caller`` (``--allow-remote``) is
what turns the check off.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
from test_attest_las import running

from tdapp.attest.las import LasClient, build_las_app
from tdapp.core.peer import endpoint, tcp_peer_uid

NOBODY = 65534
REQUEST = json.dumps({"report_data": "ab" * 64, "measurement": "c0" * 32})
pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("curl") is None,
                                reason="needs root to run a client as another uid, and curl")


def as_nobody(address: str, path: str = "/v1/evidence") -> tuple[int, dict[str, object]]:
    """POST (or GET, for the platform) as uid 65534; the HTTP status and JSON answer."""
    method = ["--data", REQUEST, "-H", "Content-Type: application/json"] \
        if path == "/v1/evidence" else []
    done = subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
         "curl", "-sS", "-g", "-o", "-", "-w", "\n%{http_code}", *method,
         f"http://{address}{path}"],
        capture_output=True, text=True, timeout=30, cwd="/", env={"PATH": os.environ["PATH"]})
    body, _, status = done.stdout.rpartition("\n")
    assert done.returncode == 0, done.stderr
    return int(status), json.loads(body)


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


def test_another_uid_gets_no_evidence(tmp_path: Path) -> None:
    with running(build_las_app(tmp_path)) as address:
        status, answer = as_nobody(address)
        assert status == 403
        assert "signature" not in answer and "body" not in answer
        assert answer["kind"] == "refused" and "answers only uid 0" in str(answer["reason"])
        status, answer = as_nobody(address, "/v1/platform")
        assert status == 403 and "public_key" not in answer
        # Its own user is answered: the refusal is about who asks, not what.
        assert "signature" in LasClient(address).evidence(b"\xab" * 64, "c0" * 32)


@pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6 loopback here")
def test_another_uid_gets_no_evidence_over_ipv6(tmp_path: Path) -> None:
    app = build_las_app(tmp_path)
    with running(app, host="::1") as address:
        status, answer = as_nobody(address)
        assert status == 403 and "signature" not in answer
        assert "signature" in LasClient(address).evidence(b"\xab" * 64, "c0" * 32)


def test_unsafe_any_caller_is_what_lets_strangers_in(tmp_path: Path) -> None:
    with running(build_las_app(tmp_path, unsafe_any_caller=True)) as address:
        status, answer = as_nobody(address)
        assert status == 200 and "signature" in answer


def test_a_service_run_for_another_uid_refuses_its_runner(tmp_path: Path) -> None:
    with running(build_las_app(tmp_path, serve_uid=NOBODY)) as address:
        status, answer = as_nobody(address)
        assert status == 200 and "signature" in answer
        with pytest.raises(Exception, match="answers only uid 65534"):
            LasClient(address).evidence(b"\xab" * 64, "c0" * 32)


def test_peer_uid_is_read_from_the_kernel_table() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server, \
            socket.create_connection(server.getsockname()) as client:
        accepted, _ = server.accept()
        with accepted:
            here = endpoint(*accepted.getsockname()[:2])
            there = endpoint(*accepted.getpeername()[:2])
            assert here is not None and there is not None
            assert tcp_peer_uid(here, there) == os.geteuid()
            assert client.getsockname()[1] == there[1]
            # A pair no socket has is nobody's.
            assert tcp_peer_uid(there, (there[0], 1)) is None


def test_no_table_means_a_stranger(tmp_path: Path) -> None:
    missing = (tmp_path / "tcp",)
    here = endpoint("127.0.0.1", 1)
    assert here is not None
    assert tcp_peer_uid(here, here, tables=missing) is None
    (tmp_path / "tcp").write_text("header\n garbage line\n")
    assert tcp_peer_uid(here, here, tables=(tmp_path / "tcp",)) is None

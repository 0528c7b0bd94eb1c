"""The simulated LAS: real servers (in a thread and as ``tdapp las serve``) and its client.

Evidence it signs verifies and says what was asked; it keeps its platform key
across restarts; bad requests get a 400 with a reason, never a 500; it will not
listen beyond loopback unless told to.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from aiohttp import web
from conftest import CliResult, assert_error

from tdapp.attest import SimVerifier, Workload, report_data, verifier_for
from tdapp.attest.las import LasClient, build_las_app, is_loopback, platform_of
from tdapp.errors import ExitCode, InputError, RefusedError, UnavailableError, UsageError

MEASUREMENT = "c0" * 32
DATA = report_data("a nonce", b"an ephemeral key", Workload("c0" * 32, "a session", "a service"))
# Runs the CLI with the las group registered, whether or not tdapp.cli has it yet.
CLI = ("import sys; from tdapp.cli import cli, run; from tdapp.cli.las import las; "
       "cli.add_command(las); sys.exit(run(sys.argv[1:]))")


@contextlib.contextmanager
def running(app: web.Application, host: str = "127.0.0.1") -> Iterator[str]:
    """Serve ``app`` on a free loopback port from a thread; yields ``HOST:PORT``."""
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.TCPSite(runner, host, 0).start())
    port = runner.addresses[0][1]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


@pytest.fixture(scope="module")
def las(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """A LAS in this process: its address and its platform id."""
    app = build_las_app(tmp_path_factory.mktemp("las") / "state")
    with running(app) as address:
        yield address, platform_of(app).platform


# -- evidence from a real LAS -------------------------------------------------------------


def test_evidence_from_the_las_verifies_with_the_right_claims(las: tuple[str, str]) -> None:
    address, platform = las
    before = time.time()
    evidence = LasClient(address).evidence(DATA, MEASUREMENT)
    claims = verifier_for(evidence).verify(evidence, at=time.time())
    assert isinstance(verifier_for(evidence), SimVerifier)
    assert (claims.tee, claims.measurement, claims.report_data, claims.platform) == (
        "sim", MEASUREMENT, DATA, platform)
    assert (claims.debug, claims.tcb_status, claims.advisories) == (False, "UpToDate", ())
    assert before - 1 <= claims.issued_at <= time.time() + 1


def test_debug_evidence(las: tuple[str, str]) -> None:
    evidence = LasClient(las[0]).evidence(DATA, MEASUREMENT, debug=True)
    assert SimVerifier().verify(evidence, at=time.time()).debug is True


def test_the_platform_endpoint(las: tuple[str, str]) -> None:
    address, platform = las
    answer = LasClient(address).platform()
    assert answer["platform"] == platform
    assert hashlib.sha256(base64.b64decode(answer["public_key"])).hexdigest() == platform
    evidence = LasClient(address).evidence(DATA, MEASUREMENT)
    assert evidence["public_key"] == answer["public_key"]


def test_upper_case_hex_is_accepted_and_normalized(las: tuple[str, str]) -> None:
    answer = httpx.post(f"http://{las[0]}/v1/evidence", json={
        "report_data": DATA.hex().upper(), "measurement": MEASUREMENT.upper()})
    assert answer.status_code == 200
    claims = SimVerifier().verify(answer.json(), at=time.time())
    assert (claims.measurement, claims.report_data, claims.debug) == (MEASUREMENT, DATA, False)


# -- bad requests ---------------------------------------------------------------------------

GOOD = {"report_data": DATA.hex(), "measurement": MEASUREMENT, "debug": False}


@pytest.mark.parametrize(("body", "reason"), [
    (b"", "the request body is not JSON"),
    (b"{", "the request body is not JSON"),
    (b"\xff", "the request body is not JSON"),
    (b"[" * 2000 + b"]" * 2000, "the request body is not JSON"),
    (b"[]", "the request body must be a JSON object"),
    (b"null", "the request body must be a JSON object"),
    (b'{"measurement": "' + MEASUREMENT.encode() + b'"}', "report_data is missing"),
    (b'{"report_data": "' + DATA.hex().encode() + b'"}', "measurement is missing"),
])
def test_malformed_bodies_get_400(las: tuple[str, str], body: bytes, reason: str) -> None:
    answer = httpx.post(f"http://{las[0]}/v1/evidence", content=body)
    assert answer.status_code == 400
    assert answer.json() == {"kind": "input", "reason": reason}


@pytest.mark.parametrize(("change", "reason"), [
    ({"report_data": DATA.hex()[:-2]}, "report_data must be 128 hex characters"),
    ({"report_data": "zz" * 64}, "report_data must be 128 hex characters"),
    ({"report_data": 5}, "report_data must be 128 hex characters"),
    ({"measurement": "c0" * 33}, "measurement must be 64 hex characters"),
    ({"measurement": ["c0"]}, "measurement must be 64 hex characters"),
    ({"debug": "no"}, "debug must be true or false"),
    ({"debug": 0}, "debug must be true or false"),
    ({"tee": "sgx"}, "unexpected field 'tee' (expected report_data, measurement, debug)"),
])
def test_bad_fields_get_400(las: tuple[str, str], change: dict[str, object],
                            reason: str) -> None:
    answer = httpx.post(f"http://{las[0]}/v1/evidence", json={**GOOD, **change})
    assert answer.status_code == 400
    assert answer.json() == {"kind": "input", "reason": reason}


def test_other_failures_are_json_and_never_500(las: tuple[str, str]) -> None:
    base = f"http://{las[0]}"
    too_big = httpx.post(f"{base}/v1/evidence", content=b" " * 10_000)
    assert too_big.status_code == 413 and "larger than" in too_big.json()["reason"]
    assert too_big.json()["kind"] == "too_large"
    wrong_method = httpx.get(f"{base}/v1/evidence")
    assert wrong_method.status_code == 405 and wrong_method.json()["kind"] == "usage"
    missing = httpx.get(f"{base}/v1/nothing")
    assert missing.status_code == 404
    assert missing.json() == {"kind": "not_found", "reason": "Not Found"}


# -- the client ---------------------------------------------------------------------------


def test_the_client_reports_a_refusal(las: tuple[str, str]) -> None:
    with pytest.raises(RefusedError, match=r"refused the request \(HTTP 400\): measurement "
                                           "must be 64 hex characters"):
        LasClient(las[0]).evidence(DATA, "not hex")


def test_the_client_reports_an_unreachable_las() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(UnavailableError, match=f"cannot reach the LAS at 127.0.0.1:{port}"):
        LasClient(f"127.0.0.1:{port}", timeout=2).evidence(DATA, MEASUREMENT)


def test_the_client_rejects_a_bad_address() -> None:
    with pytest.raises(UsageError):
        LasClient("127.0.0.1:notaport")
    assert str(LasClient("[::1]").address) == "[::1]:18766"


# -- the platform key ----------------------------------------------------------------------


def test_the_platform_key_is_kept_and_private(tmp_path: Path) -> None:
    first = platform_of(build_las_app(tmp_path / "state"))
    key_file = tmp_path / "state" / "platform.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "state").stat().st_mode) == 0o700
    assert platform_of(build_las_app(tmp_path / "state")).platform == first.platform
    assert platform_of(build_las_app(tmp_path / "other")).platform != first.platform


def test_a_readable_or_broken_key_is_refused(tmp_path: Path) -> None:
    build_las_app(tmp_path)
    key_file = tmp_path / "platform.key"
    key_file.chmod(0o644)
    with pytest.raises(InputError, match="readable by other users"):
        build_las_app(tmp_path)
    key_file.chmod(0o600)
    key_file.write_bytes(b"not a key")
    with pytest.raises(InputError, match="cannot load the platform key"):
        build_las_app(tmp_path)


# -- tdapp las serve ---------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tdapp(home: Path, *args: str) -> subprocess.Popen[bytes]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home),
           "TDAPP_HOME": str(home), "PYTHONUNBUFFERED": "1", "LANG": "C.UTF-8"}
    log = (home / "stderr.log").open("wb")
    with log:
        return subprocess.Popen([sys.executable, "-c", CLI, *args], env=env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=log)


def serve_once(home: Path) -> str:
    """Start ``tdapp las serve``, ask it for evidence, stop it; return the platform id printed."""
    port = free_port()
    process = tdapp(home, "las", "serve", "--port", str(port))
    log = home / "stderr.log"
    try:
        deadline = time.monotonic() + 30
        while "platform " not in log.read_text():
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the LAS did not start"
            time.sleep(0.05)
        printed = log.read_text()
        assert f"http://127.0.0.1:{port}" in printed
        platform = printed.split("platform ", 1)[1].split()[0]
        evidence = LasClient(f"127.0.0.1:{port}").evidence(DATA, MEASUREMENT)
        assert SimVerifier().verify(evidence, at=time.time()).platform == platform
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0, log.read_text()
    assert "Traceback" not in log.read_text()
    return platform


def test_serve_keeps_its_platform_across_restarts(tmp_path: Path) -> None:
    first = serve_once(tmp_path)
    assert len(first) == 64
    assert (tmp_path / "las" / "platform.key").exists()  # default: $TDAPP_HOME/las
    assert serve_once(tmp_path) == first


def run_cli(home: Path, *args: str) -> CliResult:
    process = tdapp(home, *args)
    code = process.wait(timeout=60)
    return CliResult(code, "", (home / "stderr.log").read_text())


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.7", "example.org", "::"])
def test_serve_refuses_a_non_loopback_host(tmp_path: Path, host: str) -> None:
    result = run_cli(tmp_path, "las", "serve", "--host", host, "--port", str(free_port()))
    assert_error(result, ExitCode.USAGE, "pass --allow-remote")
    assert not (tmp_path / "las").exists()


def test_serve_reports_a_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        result = run_cli(tmp_path, "las", "serve", "--port", str(sock.getsockname()[1]))
    assert_error(result, ExitCode.UNAVAILABLE, "cannot listen on 127.0.0.1:")


def test_serve_help_warns_about_remote_use(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-c", CLI, "las", "serve", "--help"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0
    assert "--allow-remote" in done.stdout and "signs evidence for any" in done.stdout


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("127.8.9.10", True), ("::1", True), ("[::1]", True),
    ("localhost", True), ("0.0.0.0", False), ("", False), ("10.0.0.1", False),
    ("las.example", False), ("::", False)])
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback

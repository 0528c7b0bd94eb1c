"""The transfer service over time, for real (``tdapp transfer serve`` on loopback):
expiry and its sweep, the quota (concurrent uploads too), DELETE for the uploader only,
upload tokens (revoked by editing their file), the non-loopback safe default, and
``tdapp transfer put|get|delete``. Attacks assert their effect did not happen: the
file is still there, nothing was stored.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from conftest import CliResult, assert_error, run_tdapp
from test_transfer_service import (
    Service,
    free_port,
    no_progress,
    random_file,
    start_service,
    wait_for,
)

from tdapp.errors import (
    AuthenticationRequired,
    InputError,
    TooLargeError,
    UsageError,
)
from tdapp.transfer import delete, upload
from tdapp.transfer.lifecycle import parse_duration, parse_size

ALICE, BOB = "alice-upload-token-0123456789", "bob-upload-token-9876543210abc"


@pytest.fixture(autouse=True)
def client_home(tmp_path_factory: pytest.TempPathFactory,
                monkeypatch: pytest.MonkeyPatch) -> Path:
    """The in-process client's own TDAPP_HOME (its uploads.json), and no token file."""
    home = tmp_path_factory.mktemp("client-home")
    monkeypatch.setenv("TDAPP_HOME", str(home))
    monkeypatch.delenv("TDAPP_TRANSFER_TOKEN_FILE", raising=False)
    return home


def token_file(folder: Path, *tokens: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "client.token"
    path.write_text("".join(f"{token}\n" for token in tokens))
    return path


def use_token(monkeypatch: pytest.MonkeyPatch, folder: Path, token: str) -> None:
    monkeypatch.setenv("TDAPP_TRANSFER_TOKEN_FILE", str(token_file(folder, token)))


def write_tokens(path: Path, text: str) -> None:
    """Rewrite the operator's token file so that its change shows even on a coarse clock."""
    before = path.stat().st_mtime_ns if path.exists() else 0
    path.write_text(text)
    os.utime(path, ns=(before + 2_000_000_000, before + 2_000_000_000))


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Service, Path]]:
    """A service that takes uploads only with ALICE's or BOB's token."""
    home = tmp_path_factory.mktemp("guarded-home")
    tokens = home.parent / f"{home.name}-tokens"
    write_tokens(tokens, f"# the operator's tokens\n{ALICE}  # alice\n{BOB}\n")
    running = start_service(home, "--upload-token-file", str(tokens))
    yield running, tokens
    running.stop()


def objects(service: Service) -> list[str]:
    return [name for name in service.store_files() if name.startswith("objects/")]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_durations_and_sizes() -> None:
    assert [parse_duration(text) for text in ("7d", "12h", "30m", "45s", "45", "0")] == [
        7 * 86400, 43200, 1800, 45, 45, None]
    assert parse_size("5000") == 5000 and parse_size("20G") == 20 << 30
    for bad in ("7 days", "-1d", "d"):
        with pytest.raises(UsageError, match="not a duration"):
            parse_duration(bad)


def test_uploads_without_an_accepted_token_are_refused_and_store_nothing(
        guarded: tuple[Service, Path], tmp_path: Path, client_home: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Attacks the upload authorisation: no token, a wrong one, a prefix of a real one,
    another scheme, the comment of the file. What must not happen: anything stored."""
    service, _ = guarded
    before = service.store_files()
    for headers in ({}, bearer("not-a-token-of-this-service"), bearer(ALICE[:-1]),
                    bearer(f"{ALICE}x"), bearer("alice"), {"Authorization": f"Basic {ALICE}"},
                    {"Authorization": ALICE}):
        answer = httpx.post(service.upload_url, content=b"x" * 5000, headers=headers)
        assert answer.status_code == 401, (headers, answer.text)
        assert answer.json()["kind"] == "authentication_required"
        assert answer.headers["WWW-Authenticate"].startswith("Bearer")
    multipart = httpx.post(service.upload_url, files={"f": ("a.zip", b"z" * 5000)})
    assert multipart.status_code == 401
    with pytest.raises(AuthenticationRequired, match="401") as refused:
        upload(random_file(tmp_path, "a.bin", 100), service.upload_url, progress=no_progress)
    assert "no upload token sent" in str(refused.value)
    assert str(client_home / "transfer.token") in str(refused.value)
    use_token(monkeypatch, tmp_path, "wrong-token-but-long-enough")
    with pytest.raises(AuthenticationRequired, match=r"not accepted.*client\.token"):
        upload(tmp_path / "a.bin", service.upload_url, progress=no_progress)
    assert service.store_files() == before
    # The holders of the tokens upload, by TDAPP_TRANSFER_TOKEN_FILE or $TDAPP_HOME's file.
    use_token(monkeypatch, tmp_path, ALICE)
    url = upload(tmp_path / "a.bin", service.upload_url, progress=no_progress)
    assert httpx.get(url).content == (tmp_path / "a.bin").read_bytes()
    monkeypatch.delenv("TDAPP_TRANSFER_TOKEN_FILE")
    (client_home / "transfer.token").write_text(f"# mine\n{BOB}\n")
    assert upload(tmp_path / "a.bin", service.upload_url, progress=no_progress) != url


def test_a_token_removed_from_the_file_is_refused_without_a_restart(
        guarded: tuple[Service, Path], tmp_path: Path) -> None:
    service, tokens = guarded
    original = tokens.read_text()
    assert httpx.post(service.upload_url, content=b"1", headers=bearer(BOB)).status_code == 200
    try:
        write_tokens(tokens, f"{ALICE}\n")  # BOB revoked
        before = service.store_files()
        answer = httpx.post(service.upload_url, content=b"2", headers=bearer(BOB))
        assert answer.status_code == 401 and "revoked" in answer.json()["reason"]
        assert service.store_files() == before
        assert httpx.post(service.upload_url, content=b"3",
                          headers=bearer(ALICE)).status_code == 200
        tokens.rename(tokens.with_name("moved-away"))  # unreadable: every upload refused
        assert httpx.post(service.upload_url, content=b"5",
                          headers=bearer(ALICE)).status_code == 401
        assert len(service.store_files()) == len(before) + 1  # ALICE's upload
    finally:
        write_tokens(tokens, original)
    assert httpx.post(service.upload_url, content=b"4", headers=bearer(BOB)).status_code == 200


def test_the_uploader_deletes_its_upload(guarded: tuple[Service, Path], tmp_path: Path,
                                         client_home: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    service, _ = guarded
    use_token(monkeypatch, tmp_path, ALICE)
    url = upload(random_file(tmp_path, "out.zip", 20_000), service.upload_url,
                 progress=no_progress)
    token = url.split("/")[-2]
    records = client_home / "uploads.json"
    assert stat.S_IMODE(records.stat().st_mode) == 0o600
    assert url in json.loads(records.read_text())
    assert f"objects/{token}/out.zip" in objects(service)
    delete(url)
    assert httpx.get(url).status_code == 404
    assert not (service.home / "transfer" / "objects" / token).exists()
    assert url not in json.loads(records.read_text())
    with pytest.raises(InputError, match="no delete token for"):
        delete(url)


def test_nobody_else_can_delete_an_upload(guarded: tuple[Service, Path], tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Attacks DELETE: no token, a wrong one, the download token, another upload's delete
    token, another user's client. What must not happen: the object going."""
    service, _ = guarded
    data = os.urandom(30_000)
    answer = httpx.post(service.upload_url, content=data, headers=bearer(ALICE))
    url, mine = answer.text.strip(), answer.headers["X-Delete-Token"]
    other = httpx.post(service.upload_url, content=b"o", headers=bearer(BOB))
    theirs = other.headers["X-Delete-Token"]
    assert len(mine) >= 22 and mine != theirs and answer.headers["Cache-Control"] == "no-store"
    before = service.store_files()
    for headers in ({}, {"X-Delete-Token": ""}, {"X-Delete-Token": theirs},
                    {"X-Delete-Token": mine[:-1]}, {"X-Delete-Token": url.split("/")[-2]},
                    {"X-Delete-Token": mine.upper() if mine.upper() != mine else "x"},
                    bearer(ALICE)):
        refused = httpx.delete(url, headers=headers)
        assert refused.status_code == 403, (headers, refused.text)
        assert refused.json()["kind"] == "refused"
    monkeypatch.setenv("TDAPP_HOME", str(tmp_path / "someone-else"))
    with pytest.raises(InputError, match="only its uploader"):
        delete(url)
    assert service.store_files() == before
    assert httpx.get(url).content == data
    folder = service.home / "transfer" / "objects" / url.split("/")[-2]
    assert os.readlink(folder / ".delete-sha256") == hashlib.sha256(mine.encode()).hexdigest()
    for kept in (service.home / "transfer").rglob("*"):  # only the token's SHA-256 is kept
        assert not kept.is_file() or mine.encode() not in kept.read_bytes()
    assert httpx.delete(url, headers={"X-Delete-Token": mine}).status_code == 204


def test_put_get_delete_through_the_cli_keep_the_delete_token_out_of_sight(
        guarded: tuple[Service, Path], tmp_path: Path) -> None:
    """The delete token is in no argument, environment variable, output or log."""
    service, _ = guarded
    home = tmp_path / "home"
    env = {"TDAPP_HOME": str(home), "TDAPP_PUSH": service.upload_url,  # put's default URL
           "TDAPP_TRANSFER_TOKEN_FILE": str(token_file(tmp_path, ALICE))}
    source = random_file(tmp_path, "result.zip", 300_000)
    put = run_tdapp("transfer", "put", source, "--json", env=env)
    assert put.code == 0, put.err
    answer = json.loads(put.out)
    url = answer["url"]
    assert answer == {"url": url, "name": "result.zip", "size": 300_000,
                      "delete_token_saved": True}
    secret = json.loads((home / "uploads.json").read_text())[url]
    got = run_tdapp("transfer", "get", url, tmp_path / "back.zip", env=env)
    assert got.code == 0, got.err
    assert (tmp_path / "back.zip").read_bytes() == source.read_bytes()
    piped = subprocess.run([sys.executable, "-m", "tdapp", "transfer", "get", url, "-"],
                           env={**os.environ, **env}, capture_output=True, timeout=60,
                           check=False)
    assert piped.returncode == 0 and piped.stdout == source.read_bytes(), piped.stderr
    removed = run_tdapp("transfer", "delete", url, env=env)
    assert removed.code == 0, removed.err
    assert httpx.get(url).status_code == 404
    assert_error(run_tdapp("transfer", "delete", url, env=env), 3, "no delete token")
    for seen in (put, got, removed, *env.values(), service.log.read_text()):
        assert secret not in str(seen)
    assert ALICE not in service.log.read_text()  # nor is the upload token


def test_an_expired_object_is_answered_404_at_once(tmp_path: Path) -> None:
    """Attacks expiry between sweeps: an object older than --keep is still on disk (the
    next sweep is minutes away). What must not happen: it being served or deleted."""
    service = start_service(tmp_path / "home", "--keep", "1h")
    try:
        answer = httpx.post(service.upload_url, content=b"old news", params={"name": "o.txt"})
        url = answer.text.strip()
        assert httpx.get(url).content == b"old news"
        stored = service.home / "transfer" / "objects" / url.split("/")[-2] / "o.txt"
        two_hours_ago = time.time() - 7200
        os.utime(stored, (two_hours_ago, two_hours_ago))
        assert httpx.get(url).status_code == 404
        assert httpx.delete(url, headers={"X-Delete-Token": answer.headers["X-Delete-Token"]}
                            ).status_code == 404
        assert stored.exists()  # the check, not the sweep, refused it
    finally:
        service.stop()


def test_the_sweep_removes_expired_objects_and_frees_their_quota(tmp_path: Path) -> None:
    service = start_service(tmp_path / "home", "--keep", "1s", "--quota", "1000")
    try:
        first = httpx.post(service.upload_url, content=b"a" * 800).text.strip()
        before = service.store_files()
        full = httpx.post(service.upload_url, content=b"b" * 800)
        assert full.status_code == 413 and "quota of 1000 bytes" in full.json()["reason"]
        assert service.store_files() == before
        wait_for(lambda: objects(service) == [], "the expired object was not swept")
        assert httpx.get(first).status_code == 404
        wait_for(lambda: f"sweep: removed {first.split('/', 4)[-1]} (800 bytes)"
                 in service.log.read_text(), "the sweep did not log what it removed")
        assert httpx.post(service.upload_url, content=b"c" * 800).status_code == 200
    finally:
        service.stop()


def test_the_spool_file_of_a_killed_server_is_swept_at_the_next_start(tmp_path: Path) -> None:
    home = tmp_path / "home"
    killed = start_service(home)
    spool = home / "transfer" / "spool"
    answered = httpx.post(killed.upload_url, content=b"kept").text.strip()
    with socket.create_connection(("127.0.0.1", killed.port)) as sock:
        sock.sendall(b"POST /upload?name=k.bin HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Length: 1000000\r\n\r\n" + os.urandom(200_000))
        wait_for(lambda: any(spool.iterdir()), "the upload was not spooled")
        killed.process.send_signal(signal.SIGKILL)
        killed.process.wait(timeout=15)
    left = list(spool.iterdir())
    assert len(left) == 1
    unfinished = home / "transfer" / "objects" / ("A" * 22)  # killed while publishing
    unfinished.mkdir()
    os.symlink("0" * 64, unfinished / ".delete-sha256")
    an_hour_ago = time.time() - 3600
    for path in (left[0], unfinished):
        os.utime(path, (an_hour_ago, an_hour_ago))
    fresh = spool / "fresh.part"  # another server's upload in progress, perhaps
    fresh.write_bytes(b"f")
    restarted = start_service(home, "--body-timeout", "5")
    try:
        wait_for(lambda: not left[0].exists() and not unfinished.exists(),
                 "the leftovers were not swept")
        assert fresh.exists()
        assert httpx.get(answered.replace(killed.base, restarted.base)).content == b"kept"
        log = restarted.log.read_text()
        assert f"removed the spool file {left[0].name}" in log
        assert f"the unfinished object folder {unfinished.name}" in log
    finally:
        restarted.stop()


def send(port: int, head: bytes, body: bytes = b"") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=15)
    sock.sendall(head + body)
    return sock


def answer_of(sock: socket.socket, rest: bytes = b"") -> bytes:
    """The rest of the request sent (as far as the service takes it), the whole answer."""
    received = b""
    with sock:
        with contextlib.suppress(OSError):  # the service may answer before all is sent
            sock.sendall(rest)
        with contextlib.suppress(OSError):
            while chunk := sock.recv(65536):  # Connection: close: until the service closes
                received += chunk
    return received


def chunked(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def raw_head(length: int | None) -> bytes:
    framing = b"Transfer-Encoding: chunked" if length is None else b"Content-Length: %d" % length
    return b"POST /upload HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + framing + b"\r\n\r\n"


def test_concurrent_uploads_do_not_together_overshoot_the_quota(tmp_path: Path) -> None:
    """Attacks the quota with uploads in parallel, declared and chunked. What must not
    happen: more than the quota stored, before or after a restart."""
    home = tmp_path / "home"
    service = start_service(home, "--quota", "1000000")

    def stored() -> int:
        return sum(path.stat().st_size for path in (home / "transfer" / "objects").rglob("*")
                   if path.is_file() and not path.name.startswith("."))

    def spooled() -> int:  # what the service wrote (it buffers the last few KiB)
        return sum(path.stat().st_size for path in (home / "transfer" / "spool").iterdir())

    try:
        first = send(service.port, raw_head(700_000), b"a" * 100_000)
        wait_for(lambda: spooled() > 90_000, "the first upload was not spooled")
        refused = httpx.post(service.upload_url, content=b"b" * 400_000)
        assert refused.status_code == 413 and "quota" in refused.json()["reason"]
        assert answer_of(first, b"a" * 600_000).startswith(b"HTTP/1.1 200")
        second = send(service.port, raw_head(None), chunked(b"c" * 200_000))
        wait_for(lambda: spooled() > 190_000, "the second upload was not spooled")
        third = send(service.port, raw_head(None), chunked(b"d" * 200_000))
        assert answer_of(third, b"0\r\n\r\n").startswith(b"HTTP/1.1 413")
        assert answer_of(second, b"0\r\n\r\n").startswith(b"HTTP/1.1 200")
        multipart = httpx.post(service.upload_url, files={"f": ("m", b"m" * 150_000)})
        assert multipart.status_code == 413
        assert stored() == 900_000
        with pytest.raises(TooLargeError, match="quota of 1000000 bytes"):
            upload(random_file(tmp_path, "big", 200_000), service.upload_url,
                   progress=no_progress)
    finally:
        service.stop()
    restarted = start_service(home, "--quota", "1000000")  # counts what is stored at start
    try:
        assert "(900000 bytes stored)" in restarted.log.read_text()
        assert httpx.post(restarted.upload_url, content=b"e" * 200_000).status_code == 413
        assert httpx.post(restarted.upload_url, content=b"f" * 100_000).status_code == 200
        assert stored() == 1_000_000
        assert not any((home / "transfer" / "spool").iterdir())
    finally:
        restarted.stop()


def test_a_non_loopback_service_needs_an_upload_token_file(tmp_path: Path) -> None:
    """Attacks the safe default: a service on a non-loopback address without a token file
    would take anyone's uploads. What must not happen: it starting."""
    env = {**os.environ, "TDAPP_HOME": str(tmp_path / "home")}
    for command in (("transfer", "serve", "--host", "0.0.0.0", "--port", str(free_port())),
                    ("transfer", "serve", "--host", "::", "--port", str(free_port())),
                    ("up", "--host", "0.0.0.0", "--transfer-port", str(free_port()))):
        # A short timeout: were it not refused, it would serve until killed.
        done = subprocess.run([sys.executable, "-m", "tdapp", *command], env=env, timeout=20,
                              capture_output=True, text=True, check=False)
        refused = CliResult(done.returncode, done.stdout, done.stderr)
        assert_error(refused, 2, "--upload-token-file FILE")
        assert "--allow-anonymous-uploads" in refused.err
    assert not (tmp_path / "home" / "up.json").exists()
    unsafe = start_service(tmp_path / "home", "--host", "0.0.0.0", "--allow-anonymous-uploads")
    try:
        assert httpx.post(unsafe.upload_url, content=b"x").status_code == 200
        assert "anyone who can connect" in unsafe.log.read_text()
    finally:
        unsafe.stop()


def test_serve_refuses_bad_lifecycle_options(cli: Callable[..., CliResult],
                                             tmp_path: Path) -> None:
    assert_error(cli("transfer", "serve", "--keep", "soon"), 2, "'soon' is not a duration")
    assert_error(cli("transfer", "serve", "--quota", "lots"), 2, "'lots' is not a size")
    assert_error(cli("transfer", "serve", "--upload-token-file", tmp_path / "none"), 2,
                 "does not exist")
    shown = cli("transfer", "serve", "--help")
    assert shown.code == 0 and "UNSAFE" in shown.out

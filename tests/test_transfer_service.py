"""The transfer service as a real process (``tdapp transfer serve``) and the http client.

Uploads (raw, multipart, curl) come back byte for byte; oversized uploads get a
413 and leave nothing; a cut-off upload leaves no object and no spool file;
unknown tokens get 404; a failed download leaves no file. Errors are JSON
``{"kind", "reason"}``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tdapp.errors import InputError, NotFoundError, UnavailableError
from tdapp.transfer import download, upload

# Runs the CLI with the transfer group registered, whether or not tdapp.cli has it yet.
CLI = ("from tdapp.cli import cli, main; from tdapp.cli.transfer import transfer; "
       "cli.add_command(transfer); main()")
LIMIT = 2_000_000
URL_RE = re.compile(r"http://127\.0\.0\.1:\d+/d/[A-Za-z0-9_-]{22,}/[A-Za-z0-9._-]+")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Service:
    process: subprocess.Popen[bytes]
    home: Path
    port: int
    log: Path

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def upload_url(self) -> str:
        return f"{self.base}/upload"

    def store_files(self) -> list[str]:
        root = self.home / "transfer"
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        assert self.process.wait(timeout=15) == 0, self.log.read_text()
        assert "Traceback" not in self.log.read_text()


def start_service(home: Path, *args: str, env: Mapping[str, str] | None = None) -> Service:
    """Start ``tdapp transfer serve`` on a free port with ``TDAPP_HOME=home``; wait until ready."""
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    environment = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home),
                   "TDAPP_HOME": str(home), "PYTHONUNBUFFERED": "1", "LANG": "C.UTF-8",
                   **(env or {})}
    log = home / f"transfer-{port}.log"
    with log.open("wb") as handle:
        process = subprocess.Popen(
            [sys.executable, "-c", CLI, "transfer", "serve", "--port", str(port), *args],
            env=environment, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=handle)
    deadline = time.monotonic() + 30
    while "transfer service on" not in log.read_text():
        if process.poll() is not None:
            raise AssertionError(log.read_text())
        assert time.monotonic() < deadline, "the transfer service did not start"
        time.sleep(0.05)
    return Service(process, home, port, log)


@pytest.fixture(autouse=True)
def _client_home(tmp_path_factory: pytest.TempPathFactory,
                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The client keeps delete tokens in $TDAPP_HOME/uploads.json: its own one here."""
    monkeypatch.setenv("TDAPP_HOME", str(tmp_path_factory.mktemp("client-home")))
    monkeypatch.delenv("TDAPP_TRANSFER_TOKEN_FILE", raising=False)


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    running = start_service(tmp_path_factory.mktemp("transfer-home"), "--max-size", str(LIMIT))
    yield running
    running.stop()


def no_progress(description: str, total: int | None) -> contextlib.AbstractContextManager[
        Callable[[int], None]]:
    return contextlib.nullcontext(lambda _: None)


def random_file(folder: Path, name: str, size: int) -> Path:
    path = folder / name
    path.write_bytes(os.urandom(size))
    return path


def test_client_round_trip(service: Service, tmp_path: Path) -> None:
    source = random_file(tmp_path, "encryptedOutputFiles.zip", 700_000)
    url = upload(source, service.upload_url)
    assert URL_RE.fullmatch(url), url
    assert url.endswith("/encryptedOutputFiles.zip")
    target = tmp_path / "back.zip"
    download(url, target)
    assert target.read_bytes() == source.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["back.zip", "encryptedOutputFiles.zip"]
    answer = httpx.get(url)
    assert answer.headers["content-type"] == "application/octet-stream"
    assert int(answer.headers["content-length"]) == 700_000


def test_raw_post_with_name_parameter_and_header(service: Service) -> None:
    data = os.urandom(50_000)
    answer = httpx.post(f"{service.upload_url}?name=../../etc/x y.bin", content=data,
                        headers={"Content-Type": "text/weird"})
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/plain")
    assert answer.text.count("\n") == 1
    url = answer.text.strip()
    assert URL_RE.fullmatch(url) and url.endswith("/x_y.bin"), url
    assert httpx.get(url).content == data
    answer = httpx.post(service.upload_url, content=b"abc", headers={"X-File-Name": "h.txt"})
    assert answer.text.strip().endswith("/h.txt")
    assert httpx.get(answer.text.strip()).content == b"abc"
    unnamed = httpx.post(service.upload_url, content=b"")
    assert unnamed.status_code == 200
    assert httpx.get(unnamed.text.strip()).content == b""


def test_multipart_upload(service: Service) -> None:
    data = os.urandom(123_456)
    answer = httpx.post(service.upload_url, data={"note": "first a field"},
                        files={"file": ("result.zip", data, "application/zip")})
    assert answer.status_code == 200, answer.text
    url = answer.text.strip()
    assert url.endswith("/result.zip")
    assert httpx.get(url).content == data
    empty = httpx.post(service.upload_url, data={"only": "fields"},
                       files={"x": (None, b"not a file")})
    assert empty.status_code == 400
    assert empty.json() == {"kind": "input", "reason": "the multipart body has no file part"}


def curl(*args: str) -> str:
    done = subprocess.run(["curl", "-sS", "--fail", *args], capture_output=True, text=True,
                          timeout=60, check=True)
    return done.stdout


def test_curl_data_binary_and_form(service: Service, tmp_path: Path) -> None:
    source = random_file(tmp_path, "in.bin", 300_000)
    for style in (["--data-binary", f"@{source}"], ["-F", f"file=@{source}"]):
        url = curl(*style, f"{service.upload_url}?name=in.bin").strip()
        assert URL_RE.fullmatch(url), url
        out = tmp_path / "out.bin"
        curl("--output", str(out), url)
        assert out.read_bytes() == source.read_bytes()
        out.unlink()


def test_over_the_limit_is_413_and_nothing_is_stored(service: Service, tmp_path: Path) -> None:
    before = service.store_files()
    answer = httpx.post(service.upload_url, content=b"x" * (LIMIT + 1))
    assert answer.status_code == 413
    assert answer.json() == {"kind": "too_large",
                             "reason": f"upload larger than the limit of {LIMIT} bytes"}

    def chunks() -> Iterator[bytes]:  # no Content-Length: caught while streaming
        for _ in range(LIMIT // 100_000 + 2):
            yield b"y" * 100_000

    try:
        answer = httpx.post(service.upload_url, content=chunks())
        assert answer.status_code == 413
    except httpx.HTTPError:
        pass  # the service may answer and close before the body is sent
    multipart = httpx.post(service.upload_url, files={"f": ("a", b"z" * (LIMIT + 10))})
    assert multipart.status_code == 413 and multipart.json()["kind"] == "too_large"
    source = random_file(tmp_path, "big", LIMIT + 1)
    with pytest.raises(InputError, match="413"):
        upload(source, service.upload_url, progress=no_progress)
    assert service.store_files() == before


def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_a_cut_off_upload_leaves_nothing(service: Service) -> None:
    before = service.store_files()
    with socket.create_connection(("127.0.0.1", service.port)) as sock:
        sock.sendall(b"POST /upload?name=cut.bin HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Length: 1000000\r\n\r\n" + os.urandom(300_000))
        wait_for(lambda: any(f.startswith("spool/") for f in service.store_files()),
                 "the upload was not spooled")
    wait_for(lambda: service.store_files() == before, "the cut-off upload left a file")
    assert not list((service.home / "transfer" / "objects").rglob("cut.bin"))
    wait_for(lambda: "cut off" in service.log.read_text(), "the cut was not logged")
    # The service still works afterwards.
    assert httpx.post(service.upload_url, content=b"ok").status_code == 200


def test_a_chunked_upload_broken_midway_is_refused_and_leaves_nothing(tmp_path: Path) -> None:
    """Attacks an upload with a chunked body that turns invalid after its first chunk,
    served with aiohttp's pure Python parser (it reports this as a payload error where
    the C parser drops the connection). What must not happen: a 500, or the part that
    did arrive being kept. (Once the answer is sent, that parser's own draining of the
    broken body logs a traceback of aiohttp's: the log is checked for the service's
    handler failing, not for tracebacks.)"""
    service = start_service(tmp_path / "home", env={"AIOHTTP_NO_EXTENSIONS": "1"})
    try:
        with socket.create_connection(("127.0.0.1", service.port)) as sock:
            sock.sendall(b"POST /upload?name=c.bin HTTP/1.1\r\nHost: x\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
            wait_for(lambda: any(f.startswith("spool/") for f in service.store_files()),
                     "the upload was not spooled")
            sock.sendall(b"zz\r\n")  # not a chunk size
            sock.settimeout(15)
            answer = b""
            with contextlib.suppress(OSError):
                while chunk := sock.recv(65536):
                    answer += chunk
        assert answer.startswith(b"HTTP/1.1 400"), answer
        assert json.loads(answer.partition(b"\r\n\r\n")[2]) == {
            "kind": "input", "reason": "upload incomplete: the connection broke"}
        wait_for(lambda: service.store_files() == [], "the broken upload left a file")
    finally:
        service.process.send_signal(signal.SIGTERM)
        assert service.process.wait(timeout=15) == 0
    log = service.log.read_text()
    assert "cut off (TransferEncodingError)" in log and "unexpected failure" not in log, log


def test_a_short_body_on_a_closed_connection_is_not_published(service: Service) -> None:
    before = service.store_files()
    with socket.create_connection(("127.0.0.1", service.port)) as sock:
        sock.sendall(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(5)
        with contextlib.suppress(OSError):
            sock.recv(1000)
    wait_for(lambda: service.store_files() == before, "a short upload left a file")


def test_unknown_tokens_are_404(service: Service, tmp_path: Path) -> None:
    for path in ("/d/AAAAAAAAAAAAAAAAAAAAAA/file", "/d/short/file", "/d/../../etc/passwd",
                 "/nothing"):
        answer = httpx.get(f"{service.base}{path}")
        assert answer.status_code == 404, path
        assert answer.json()["kind"] == "not_found", (path, answer.text)
    url = upload(random_file(tmp_path, "n.txt", 10), service.upload_url, progress=no_progress)
    assert httpx.get(url.rsplit("/", 1)[0] + "/other.txt").status_code == 404


def test_a_failed_download_leaves_no_file(service: Service, tmp_path: Path) -> None:
    target = tmp_path / "out.zip"
    with pytest.raises(NotFoundError, match=r"download of .* failed: 404 no such download"):
        download(f"{service.base}/d/AAAAAAAAAAAAAAAAAAAAAA/x.zip", target, progress=no_progress)
    assert list(tmp_path.iterdir()) == []
    target.write_bytes(b"kept")
    with pytest.raises(InputError, match="404"):
        download(f"{service.base}/d/AAAAAAAAAAAAAAAAAAAAAA/x.zip", target, progress=no_progress)
    assert target.read_bytes() == b"kept"
    assert [p.name for p in tmp_path.iterdir()] == ["out.zip"]


def test_unreachable_service(tmp_path: Path) -> None:
    port = free_port()
    source = random_file(tmp_path, "a", 10)
    with pytest.raises(UnavailableError, match=f"cannot reach http://127.0.0.1:{port}/upload"):
        upload(source, f"http://127.0.0.1:{port}/upload", progress=no_progress)
    with pytest.raises(UnavailableError, match=r"download of .* failed"):
        download(f"http://127.0.0.1:{port}/d/x/y", tmp_path / "b", progress=no_progress)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_public_url_and_own_store(tmp_path: Path) -> None:
    store = tmp_path / "store"
    running = start_service(tmp_path / "home", "--store", str(store),
                            "--public-url", "https://files.example/")
    try:
        answer = httpx.post(running.upload_url, content=b"hello", params={"name": "h.txt"})
        url = answer.text.strip()
        assert re.fullmatch(r"https://files\.example/d/[A-Za-z0-9_-]{22,}/h\.txt", url), url
        local = url.replace("https://files.example", running.base)
        assert httpx.get(local).content == b"hello"
        assert len(list((store / "objects").rglob("h.txt"))) == 1
        assert not (tmp_path / "home" / "transfer").exists()
    finally:
        running.stop()


def test_serve_refuses_store_and_s3_together(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-c", CLI, "transfer", "serve", "--store",
                           str(tmp_path), "--s3", "s3://b/p"], capture_output=True, text=True,
                          timeout=60, check=False,
                          env={**os.environ, "TDAPP_HOME": str(tmp_path)})
    assert done.returncode == 2
    assert done.stderr.startswith("tdapp: error: --store and --s3 exclude each other")


def test_progress_counts_every_byte(service: Service, tmp_path: Path) -> None:
    seen: list[tuple[str, int | None, int]] = []

    @contextlib.contextmanager
    def recording(description: str, total: int | None) -> Iterator[Callable[[int], None]]:
        done = [0]

        def advance(count: int) -> None:
            done[0] += count

        yield advance
        seen.append((description, total, done[0]))

    url = upload(random_file(tmp_path, "p.bin", 600_000), service.upload_url, progress=recording)
    download(url, tmp_path / "q.bin", progress=recording)
    assert seen == [("upload p.bin", 600_000, 600_000), ("download q.bin", 600_000, 600_000)]


def test_the_sweep_spares_a_slow_upload_in_progress(tmp_path: Path) -> None:
    """Attacks the spool sweep with an upload that trickles in for longer than the body
    timeout, in pieces too small to reach its spool file (the service buffers them), so
    the file looks untouched. What must not happen: the sweep deleting it mid-upload."""
    service = start_service(tmp_path / "home", "--body-timeout", "1", "--keep", "1s")
    try:
        with socket.create_connection(("127.0.0.1", service.port), timeout=15) as sock:
            sock.sendall(b"POST /upload?name=slow.bin HTTP/1.1\r\nHost: x\r\n"
                         b"Connection: close\r\nContent-Length: 2000\r\n\r\n")
            for _ in range(7):  # 2.1 s in all, never a pause of a second
                sock.sendall(b"s" * 100)
                time.sleep(0.3)
            sock.sendall(b"s" * 1300)
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 200"), answer
        url = answer.partition(b"\r\n\r\n")[2].decode().strip()
        assert httpx.get(url).content == b"s" * 2000
    finally:
        service.stop()

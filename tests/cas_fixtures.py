"""Real CAS servers, a real PostgreSQL and simulated users for the CAS integration tests.

Nothing here is mocked: a CAS is ``python -m tdapp cas serve`` in a child
process with its own ``TDAPP_HOME`` and state folder, a user is a
``TDAPP_HOME`` of their own driven through the real ``tdapp`` program, and
PostgreSQL is the distribution's server started as user ``postgres``.
The fixtures are registered by ``conftest.py`` (imported at its end).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import re
import secrets
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from conftest import CliResult

HOST = "127.0.0.1"
PG_BIN = Path("/usr/lib/postgresql/15/bin")
SERVER_START_TIMEOUT = 60.0
HEX64 = re.compile(r"^[0-9a-f]{64}$")


MRENCLAVE = "e0f45a9a862c83f383730cc2aef144081025e3f925615da5b35c4d980faaa3c9"


# -- session documents ------------------------------------------------------------------


def unique_name(prefix: str = "s") -> str:
    return f"{prefix}-{secrets.token_hex(6)}"


def fspf_variables() -> dict[str, str]:
    """Fresh values for the four FSPF variables of the seed template (keys 64 hex, tags 32)."""
    return {"INPUT_FSPF_KEY": secrets.token_hex(32), "INPUT_FSPF_TAG": secrets.token_hex(16),
            "OUTPUT_FSPF_KEY": secrets.token_hex(32), "OUTPUT_FSPF_TAG": secrets.token_hex(16)}


_RUN_SECRET = secrets.token_bytes(32)


def _per_name(name: str, volume: str, kind: str, size: int) -> str:
    digest = hmac.new(_RUN_SECRET, f"{name}\0{volume}\0{kind}".encode(), hashlib.sha256)
    return digest.hexdigest()[:2 * size]


@dataclass
class SessionDoc:
    """A session in SCONE's current (0.3) form; ``text()`` renders it as YAML."""

    name: str
    command: str = "/application"
    predecessor: str | None = None
    read: list[str] | None = None
    update: list[str] | None = None
    keys: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    secret: str | None = None
    injected: str | None = None

    def __post_init__(self) -> None:
        # Unless given, random per session name: every revision of one session keeps its
        # volumes' keys and tags (an update may not move a tag), other sessions differ.
        for volume in ("encrypted-input-files", "encrypted-output-files"):
            self.keys.setdefault(volume, _per_name(self.name, volume, "key", 32))
            self.tags.setdefault(volume, _per_name(self.name, volume, "tag", 16))

    def as_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"name": self.name, "version": "0.3"}
        if self.predecessor is not None:
            doc["predecessor"] = self.predecessor
        if self.read is not None or self.update is not None:
            doc["access_policy"] = {"read": self.read or ["CREATOR"],
                                    "update": self.update or ["CREATOR"]}
        environment = {"SCONE_MODE": "hw"}
        if self.secret is not None:
            # Secrets reach a service through its environment (a secrets section is
            # refused until the CAS makes and releases secrets).
            environment["API_TOKEN"] = self.secret
        doc["services"] = [{"name": "application", "image_name": "copy_demo",
                            "mrenclaves": [MRENCLAVE], "command": self.command, "pwd": "/",
                            "environment": environment}]
        doc["volumes"] = [{"name": name, "fspf_key": self.keys[name],
                           "fspf_tag": self.tags[name]} for name in self.keys]
        image: dict[str, Any] = {"name": "copy_demo", "volumes": [
            {"name": "encrypted-input-files", "path": "/encryptedInputs"},
            {"name": "encrypted-output-files", "path": "/encryptedOutputs"}]}
        if self.injected is not None:
            image["injection_files"] = [{"path": "/etc/app/config.ini",
                                         "content": self.injected}]
        doc["images"] = [image]
        return doc

    def text(self) -> str:
        return yaml.safe_dump(self.as_dict(), sort_keys=False)

    def body(self) -> bytes:
        return self.text().encode()


# -- PostgreSQL -------------------------------------------------------------------------


@dataclass
class Postgres:
    """A PostgreSQL 15 server of our own (trust authentication, TCP on 127.0.0.1)."""

    root: Path
    port: int
    as_postgres: list[str]

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def socket_dir(self) -> Path:
        return self.root / "sock"

    def run(self, program: str, *args: str, check: bool = True,
            timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
        done = subprocess.run([*self.as_postgres, str(PG_BIN / program), *args],
                              capture_output=True, timeout=timeout, check=False,
                              stdin=subprocess.DEVNULL)
        if check and done.returncode != 0:
            pytest.fail(f"{program} {' '.join(args)} failed ({done.returncode}):\n"
                        f"{done.stdout.decode(errors='replace')}"
                        f"{done.stderr.decode(errors='replace')}")
        return done

    def create_database(self, name: str | None = None) -> str:
        """A new, empty database; returns its ``postgresql://`` URL."""
        name = name or f"cas_{secrets.token_hex(4)}"
        self.run("createdb", "-h", HOST, "-p", str(self.port), "-U", "postgres", name)
        return self.url(name)

    def url(self, name: str) -> str:
        return f"postgresql://postgres@{HOST}:{self.port}/{name}"

    def dump(self, name: str) -> bytes:
        """``pg_dump`` of one database (plain SQL, as an operator's backup would be)."""
        return self.run("pg_dump", "-h", HOST, "-p", str(self.port), "-U", "postgres",
                        "--no-owner", name).stdout

    def stop(self) -> None:
        self.run("pg_ctl", "-D", str(self.data_dir), "stop", "-m", "immediate", check=False)


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """A real PostgreSQL 15 for the whole run; ``create_database()`` gives a fresh database."""
    missing = [name for name in ("initdb", "pg_ctl", "createdb", "pg_dump", "postgres")
               if not (PG_BIN / name).is_file()]
    if missing:
        pytest.fail(f"PostgreSQL 15 is not installed ({', '.join(missing)} missing from "
                    f"{PG_BIN}); install the Debian package 'postgresql' (make sysdeps)")
    as_postgres: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        if shutil.which("runuser") is None:
            pytest.fail("running as root but 'runuser' is missing (util-linux)")
        as_postgres = ["runuser", "-u", "postgres", "--"]
    # Not under pytest's temporary folder: its parent is mode 0700 and owned by root.
    root = Path(tempfile.mkdtemp(prefix="tdapp-pg-"))
    (root / "sock").mkdir()
    if as_postgres:
        for path in (root, root / "sock"):
            shutil.chown(path, "postgres", "postgres")
    server = Postgres(root, free_port(), as_postgres)
    server.run("initdb", "-D", str(server.data_dir), "-A", "trust", "-U", "postgres",
               "--no-sync", "-E", "UTF8", timeout=120)
    options = (f"-p {server.port} -k {server.socket_dir} -c listen_addresses={HOST} "
               f"-c fsync=off -c max_connections=200")
    server.run("pg_ctl", "-D", str(server.data_dir), "-l", str(server.root / "server.log"),
               "-o", options, "-w", "-t", "60", "start", timeout=90)
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


# -- CAS servers ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def certificate_fingerprint(pem_text: str) -> str:
    """SHA-256 of a PEM certificate's DER encoding, lower-case hex (computed here, not by tdapp)."""
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem_text)).hexdigest()


def presented_fingerprint(host: str, port: int) -> str:
    return certificate_fingerprint(ssl.get_server_certificate((host, port), timeout=10))


def child_environment(home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """A clean environment for a child process: nothing from ours leaks into templates."""
    environment = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home),
                   "LANG": "C.UTF-8", "TDAPP_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    environment.update(extra or {})
    return environment


@dataclass
class CasServer:
    """One ``tdapp cas serve`` child process."""

    home: Path
    state_dir: Path
    port: int
    log_path: Path
    db: str | None = None
    extra: tuple[str, ...] = ()
    process: subprocess.Popen[bytes] | None = None

    host = HOST

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"https://{self.address}"

    @property
    def cert_path(self) -> Path:
        return self.state_dir / "cas.crt"

    @property
    def fingerprint(self) -> str:
        return certificate_fingerprint(self.cert_path.read_text())

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self) -> None:
        command = [sys.executable, "-m", "tdapp", "cas", "serve", "--host", self.host,
                   "--port", str(self.port), "--state-dir", str(self.state_dir)]
        if self.db:
            command += ["--db", self.db]
        command += self.extra
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log,
                                            stderr=log, env=child_environment(self.home),
                                            start_new_session=True)
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while True:
            if self.process.poll() is not None:
                pytest.fail(f"the CAS exited with status {self.process.returncode} while "
                            f"starting:\n{self.log()}")
            if _accepts_tls(self.host, self.port):
                return
            if time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"the CAS did not accept TLS connections on {self.address} within "
                            f"{SERVER_START_TIMEOUT:.0f} s:\n{self.log()}")
            time.sleep(0.1)

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=15)

    def restart(self) -> None:
        self.stop()
        self.start()

    def unexpected_failures(self) -> list[str]:
        """Log lines of requests that ended in an unexpected exception (answered as 500)."""
        return [line for line in self.log().splitlines()
                if "unexpected failure" in line or line.startswith("Traceback")]


def accepts_tcp(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def _accepts_tls(host: str, port: int) -> bool:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection((host, port), timeout=2) as raw, \
                context.wrap_socket(raw, server_hostname=host):
            return True
    except OSError:
        return False


StartCas = Callable[..., CasServer]


@pytest.fixture(scope="module")
def cas_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StartCas]:
    """Start CASes: ``cas_server(db=None, state_dir=None, port=None)``; all stopped at the end."""
    started: list[CasServer] = []

    def start(*, db: str | None = None, state_dir: Path | None = None,
              port: int | None = None, extra: tuple[str, ...] = ()) -> CasServer:
        root = tmp_path_factory.mktemp("cas")
        server = CasServer(home=root / "home", state_dir=state_dir or root / "state",
                           port=port or free_port(), log_path=root / "cas.log", db=db,
                           extra=extra)
        server.home.mkdir(mode=0o700)
        started.append(server)
        server.start()
        return server

    yield start
    for server in started:
        server.stop()


# -- users ------------------------------------------------------------------------------


@dataclass
class User:
    """One simulated person: a ``TDAPP_HOME`` of their own and the ``tdapp`` program."""

    name: str
    home: Path
    _identity: str | None = None

    def tdapp(self, *args: str | Path, env: Mapping[str, str] | None = None,
              timeout: float = 120) -> CliResult:
        done = subprocess.run([sys.executable, "-m", "tdapp", *map(str, args)],
                              capture_output=True, text=True, stdin=subprocess.DEVNULL,
                              env=child_environment(self.home, env), timeout=timeout,
                              check=False)
        return CliResult(done.returncode, done.stdout, done.stderr)

    def attest(self, server: CasServer) -> str:
        """Pin ``server`` and get this identity certified by it; returns the fingerprint."""
        result = self.tdapp("cas", "attest", server.address, "--accept", server.fingerprint)
        assert result.code == 0, result.err
        printed = result.out.strip()
        assert printed == server.fingerprint, result
        assert self.cas_certificate(server).is_file(), "attest did not certify the identity"
        return printed

    @property
    def identity(self) -> str:
        """The key hash, as ``tdapp self show`` prints it."""
        if self._identity is None:
            result = self.tdapp("self", "show")
            assert result.code == 0, result.err
            match = re.search(r"^identity\s+([0-9a-f]{64})$", result.out, re.MULTILINE)
            assert match, result.out
            self._identity = match.group(1)
        return self._identity

    @property
    def key_path(self) -> Path:
        return self.home / "identity" / "client.key"

    @property
    def self_signed_certificate(self) -> Path:
        return self.home / "identity" / "client.crt"

    def cas_certificate(self, server: CasServer) -> Path:
        return self.home / "identity" / "cas" / f"{server.fingerprint}.crt"

    def pin_path(self, server: CasServer) -> Path:
        return self.home / "pins" / f"{server.host}_{server.port}.crt"

    def ssl_context(self, server: CasServer, *, certified: bool = True) -> ssl.SSLContext:
        """Trust exactly the CAS's certificate; present the CAS-issued client certificate."""
        context = ssl.create_default_context(cafile=str(server.cert_path))
        if certified:
            context.load_cert_chain(self.cas_certificate(server), self.key_path)
        return context

    def http(self, server: CasServer, *, certified: bool = True,
             timeout: float = 30) -> httpx.Client:
        return httpx.Client(base_url=server.url, timeout=timeout,
                            verify=self.ssl_context(server, certified=certified))


def anonymous_http(server: CasServer, timeout: float = 30) -> httpx.Client:
    """A client that checks the CAS certificate but presents none of its own."""
    return httpx.Client(base_url=server.url, timeout=timeout,
                        verify=ssl.create_default_context(cafile=str(server.cert_path)))


MakeUser = Callable[[str], User]


@pytest.fixture(scope="module")
def user(tmp_path_factory: pytest.TempPathFactory) -> MakeUser:
    """``user(name)``: a person with a ``TDAPP_HOME`` of their own (created empty)."""

    def make(name: str) -> User:
        home = tmp_path_factory.mktemp(f"user-{name}")
        home.chmod(0o700)
        return User(name, home)

    return make


# -- a TLS listener that records what clients send --------------------------------------


@dataclass
class RecordingTlsServer:
    """A TLS server with a certificate of its own that records every byte sent to it."""

    certificate: Path
    key: Path
    port: int = 0
    received: list[bytes] = field(default_factory=list)
    handshakes: int = 0
    _socket: socket.socket | None = None
    _thread: threading.Thread | None = None
    _stopping: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.certificate, self.key)
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((HOST, self.port))
        listener.listen(16)
        listener.settimeout(0.2)
        self.port = listener.getsockname()[1]
        self._socket = listener
        self._thread = threading.Thread(target=self._serve, args=(context,), daemon=True)
        self._thread.start()

    def _serve(self, context: ssl.SSLContext) -> None:
        assert self._socket is not None
        while not self._stopping.is_set():
            try:
                raw, _ = self._socket.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with contextlib.suppress(OSError), raw:
                raw.settimeout(5)
                with context.wrap_socket(raw, server_side=True) as tls:
                    self.handshakes += 1
                    data = b""
                    with contextlib.suppress(OSError):
                        while chunk := tls.recv(65536):
                            data += chunk
                    self.received.append(data)

    def stop(self) -> None:
        self._stopping.set()
        if self._socket is not None:
            self._socket.close()
        if self._thread is not None:
            self._thread.join(timeout=10)

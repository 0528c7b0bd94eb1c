"""CAS load: session creates, full attestations and tag updates per second, with latencies.

What it measures
    ``python -m tdapp cas serve --debug --workers N`` in three set-ups, one after the other:

    sqlite     one CAS on its own SQLite database (in its state folder).
    postgres   one CAS on a PostgreSQL 15 database of our own (started as user postgres).
    replicas   two CASes on one PostgreSQL database sharing one state folder (certificate,
               client CA, master key); client i talks to replica i mod 2.

    In each set-up a separate load process (spawned) runs N asyncio clients (``--clients``,
    32), each with its own aiohttp ClientSession (one kept-alive TLS connection, presenting
    a client certificate the CAS issued to a tdapp identity made in a temporary
    TDAPP_HOME). aiohttp rather than httpx: the load process shares the two cores with the
    CAS, and aiohttp needs about half the CPU per request.
    Every operation runs for ``--seconds`` (10; ``--quick``: 3 s and 8 clients):

    create     POST /v1/sessions with a distinct 0.3 YAML session.
    attest     POST /v1/attestation/nonce, then POST /v1/attestation with sim evidence
               signed by the benchmark's own simulated platform (the one platform the
               sessions name), report_data binding the nonce, a fresh EC P-256 key and
               the workload; one op = both requests, counted only on 200.
    tag        PUT /v1/volume-tags with the instance token (from an untimed attestation),
               old -> new chained per client so each one should succeed.
    commit     POST /v1/runs/commit: a run's commit (the output tag moved and the receipt
               signed and kept), each from a fresh instance (its attestation untimed). Its
               ratio to ``tag`` is what receipts cost a run: a constant (one signature, one
               row), whatever the run's size.

    ceiling    the same two requests of an attestation, built the same way by the same
               clients (only the JWE is not opened: there is none), against
               ``cas_bare.py``: the CAS's stack (aiohttp, tdapp.serving, the TLS context
               the CAS builds from the same state folder, client certificates verified,
               as many processes on one port as the CAS has) answering with no work.
               Measured in two halves, just before and just after ``attest``.

How to read it
    One row per set-up x operation: ops/s (successes / wall time), p50 and p99 latency of
    successful ops (ms), errors (non-2xx or exceptions), and the load process's CPU use
    (100 % = one core busy: the clients, not the CAS, may then be the limit); then
    attestations/s as a share of the ceiling, with the server CPU per operation of the
    CAS and of the bare stack. Targets: attestations >= 25 % of the ceiling and their p99
    <= 50 ms at 32 clients, the other operations' p99 < 100 ms, zero errors anywhere
    (ceiling included). The last stdout line is one JSON object with every figure;
    progress goes to stderr. Each CAS runs with ``--workers`` (2).

    .venv/bin/python benchmarks/cas_load.py [--quick] [--clients N] [--seconds S] [--workers N]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import multiprocessing
import os
import secrets
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from rich.console import Console
from rich.table import Table

from tdapp.attest import Workload, report_data
from tdapp.attest.sim import platform_id, sign_evidence
from tdapp.client.key_release import EphemeralKey

BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

from benchkit.processes import log  # noqa: E402

HOST = "127.0.0.1"
PG_BIN = Path("/usr/lib/postgresql/15/bin")
START_TIMEOUT_S = 60.0
REQUEST_TIMEOUT_S = 30.0
MRENCLAVE = "e0f45a9a862c83f383730cc2aef144081025e3f925615da5b35c4d980faaa3c9"
SERVICE = "application"
OUTPUT_VOLUME = "encrypted-output-files"
VOLUMES = ("encrypted-input-files", OUTPUT_VOLUME)
SETUPS = ("sqlite", "postgres", "replicas")
OPERATIONS = ("create", "attest", "tag", "commit")
TARGET_SHARE_PERCENT = 25.0
TARGET_ATTEST_P99_MS = 50.0
TARGET_P99_MS = 100.0
TARGET_CLIENTS = 32
DEFAULT_WORKERS = 2


# -- session documents and evidence -------------------------------------------------------


# The benchmark's simulated platform: fixed, so that the load processes and the
# sessions they create agree on it (it protects nothing; sim is for development).
PLATFORM = Ed25519PrivateKey.from_private_bytes(
    hashlib.sha256(b"tdapp cas_load benchmark platform").digest())
PLATFORM_ID = platform_id(PLATFORM.public_key().public_bytes(
    serialization.Encoding.Raw, serialization.PublicFormat.Raw))


def session_document(name: str) -> tuple[str, str]:
    """A distinct 0.3 session as YAML, and its output volume's initial tag."""
    tags = {volume: secrets.token_hex(16) for volume in VOLUMES}
    document = {
        "name": name, "version": "0.3",
        "security": {"attestation": {"mode": "sim", "platforms": [PLATFORM_ID]}},
        "services": [{"name": SERVICE, "image_name": "copy_demo", "mrenclaves": [MRENCLAVE],
                      "command": "/application", "pwd": "/"}],
        "volumes": [{"name": volume, "fspf_key": secrets.token_hex(32),
                     "fspf_tag": tags[volume]} for volume in VOLUMES],
        "images": [{"name": "copy_demo", "volumes": [
            {"name": "encrypted-input-files", "path": "/encryptedInputs"},
            {"name": OUTPUT_VOLUME, "path": "/encryptedOutputs"}]}],
    }
    return yaml.safe_dump(document, sort_keys=False), tags[OUTPUT_VOLUME]


# -- what the load process is given and gives back ------------------------------------------


@dataclass(frozen=True)
class LoadSpec:
    urls: tuple[str, ...]
    bare_urls: tuple[str, ...]
    ca_file: str
    cert_file: str
    key_file: str
    clients: int
    seconds: float
    server_pids: tuple[int, ...] = ()  # the CAS processes, for their CPU per operation
    bare_pids: tuple[int, ...] = ()


@dataclass
class OpStats:
    ops: int = 0
    errors: int = 0
    wall_s: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    error_samples: list[str] = field(default_factory=list)
    load_cpu_percent: float = 0.0
    server_cpu_s: float | None = None  # CPU time of the server processes, when measured

    def failed(self, what: str) -> None:
        self.errors += 1
        if len(self.error_samples) < 5 and what not in self.error_samples:
            self.error_samples.append(what[:200])

    def merged(self, other: OpStats) -> OpStats:
        """Both measurements as one (ops over the sum of their wall times)."""
        merged = OpStats(self.ops + other.ops, self.errors + other.errors,
                         self.wall_s + other.wall_s, self.latencies_ms + other.latencies_ms,
                         (self.error_samples + other.error_samples)[:5],
                         server_cpu_s=None if self.server_cpu_s is None or other.server_cpu_s
                         is None else self.server_cpu_s + other.server_cpu_s)
        if merged.wall_s:
            merged.load_cpu_percent = (self.load_cpu_percent * self.wall_s + other.load_cpu_percent
                                       * other.wall_s) / merged.wall_s
        return merged

    @property
    def per_s(self) -> float:
        return self.ops / self.wall_s if self.wall_s else 0.0

    def percentile(self, fraction: float) -> float | None:
        if not self.latencies_ms:
            return None
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]

    def as_json(self) -> dict[str, Any]:
        p50, p99 = self.percentile(0.50), self.percentile(0.99)
        return {"ops": self.ops, "errors": self.errors, "seconds": round(self.wall_s, 2),
                "ops_per_s": round(self.per_s, 1),
                "p50_ms": None if p50 is None else round(p50, 2),
                "p99_ms": None if p99 is None else round(p99, 2),
                "load_cpu_percent": round(self.load_cpu_percent, 0),
                "server_cpu_ms_per_op": (round(1000 * self.server_cpu_s / self.ops, 3)
                                         if self.ops and self.server_cpu_s is not None
                                         else None),
                "error_samples": self.error_samples}


class RequestFailed(Exception):
    pass


@dataclass
class Client:
    http: aiohttp.ClientSession
    base_url: str
    platform: Ed25519PrivateKey
    session: str = ""
    tag: str = ""
    token: str = ""

    async def _call(self, method: str, path: str, expected: tuple[int, ...],
                    **options: Any) -> Any:
        async with self.http.request(method, self.base_url + path, **options) as response:
            text = await response.text()
            if response.status not in expected:
                raise RequestFailed(f"{method} {path}: {response.status} {text[:120]}")
            return json.loads(text) if text else None

    async def create(self) -> str:
        name = f"bench-{secrets.token_hex(8)}"
        text, tag = session_document(name)
        await self._call("POST", "/v1/sessions", (200, 201), data=text.encode())
        self.session, self.tag = name, tag
        return name

    async def attest(self, *, bare: bool = False) -> str:
        """One attestation (nonce, evidence, key release); the instance token.

        ``bare``: against the bare-stack server (``cas_bare.py``), which answers
        without work: the same requests, built the same way, but its answer is no JWE
        to open (a real one would be server work).
        """
        body = {"session": self.session, "service": SERVICE}
        nonce = str((await self._call("POST", "/v1/attestation/nonce", (200, 201),
                                      json=body))["nonce"])
        key = EphemeralKey()
        workload = Workload(MRENCLAVE, self.session, SERVICE)
        evidence = sign_evidence(self.platform, measurement=MRENCLAVE,
                                 report_data=report_data(nonce, key.public_der, workload),
                                 debug=False, issued_at=time.time())
        answer = await self._call("POST", "/v1/attestation", (200,), json={
            **body, "nonce": nonce, "public_key": key.public_b64url,
            "workload": MRENCLAVE, "evidence": evidence})
        if bare:
            if str(answer.get("jwe", "")).count(".") != 4:
                raise RequestFailed("the bare server answered no compact JWE")
            return ""
        return key.open(str(answer["jwe"])).token.get_secret_value()

    async def update_tag(self) -> None:
        new = secrets.token_hex(16)
        await self._call("PUT", "/v1/volume-tags", (200, 201, 204),
                         headers={"Authorization": f"Bearer {self.token}"},
                         json={"session": self.session, "volume": OUTPUT_VOLUME,
                               "old": self.tag, "new": new})
        self.tag = new

    async def commit(self) -> None:
        new = secrets.token_hex(16)
        answer = await self._call("POST", "/v1/runs/commit", (200,),
                                  headers={"Authorization": f"Bearer {self.token}"},
                                  json={"session": self.session, "bundle_sha256": "ab" * 32,
                                        "moves": [{"volume": OUTPUT_VOLUME, "old": self.tag,
                                                   "new": new}]})
        if not str(answer.get("receipt", "")).count(".") == 2:
            raise RequestFailed("the commit answered no compact JWS receipt")
        self.tag = new


def server_cpu_seconds(pids: tuple[int, ...]) -> float:
    """User + system CPU of these processes and their children (a CAS's workers)."""
    total, ticks = 0.0, os.sysconf("SC_CLK_TCK")
    seen: set[int] = set()
    todo = list(pids)
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / ticks
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except (OSError, IndexError, ValueError):
            continue
        todo += [int(child) for child in children]
    return total


async def _run_operation(clients: list[Client], operation: str, seconds: float,
                         servers: tuple[int, ...] = ()) -> OpStats:
    stats = OpStats()
    stop_at = time.perf_counter() + seconds

    async def one(client: Client) -> None:
        while time.perf_counter() < stop_at:
            began = time.perf_counter()
            try:
                if operation == "create":
                    await client.create()
                elif operation == "attest":
                    await client.attest()
                elif operation == "ceiling":
                    await client.attest(bare=True)
                elif operation == "commit":
                    client.token = await client.attest()  # one commit per instance: untimed
                    began = time.perf_counter()
                    await client.commit()
                else:
                    await client.update_tag()
            except Exception as error:  # every failure is a figure, not a crash
                stats.failed(f"{type(error).__name__}: {error}")
                if operation in ("tag", "commit"):  # the chain is broken: this client stops
                    return
                continue
            stats.latencies_ms.append((time.perf_counter() - began) * 1000)
            stats.ops += 1

    cpu0, began = time.process_time(), time.perf_counter()
    server0 = server_cpu_seconds(servers)
    await asyncio.gather(*(one(client) for client in clients))
    stats.wall_s = time.perf_counter() - began
    stats.load_cpu_percent = 100 * (time.process_time() - cpu0) / stats.wall_s
    if servers:
        stats.server_cpu_s = server_cpu_seconds(servers) - server0
    return stats


async def _drive(spec: LoadSpec) -> dict[str, Any]:
    context = ssl.create_default_context(cafile=spec.ca_file)
    context.load_cert_chain(spec.cert_file, spec.key_file)
    platform = PLATFORM
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)

    def connect(urls: tuple[str, ...], index: int) -> Client:
        return Client(aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1, ssl=context),
                                            timeout=timeout), urls[index % len(urls)], platform)

    clients = [connect(spec.urls, index) for index in range(spec.clients)]
    bare = [connect(spec.bare_urls, index) for index in range(spec.clients)]
    results: dict[str, Any] = {}
    try:
        results["create"] = (await _run_operation(clients, "create", spec.seconds)).as_json()
        # Untimed: a fresh session per client (the create phase may have ended mid-way).
        await asyncio.gather(*(client.create() for client in clients))
        for twin, client in zip(bare, clients, strict=True):
            twin.session = client.session  # the same request bodies
        # The ceiling in two halves around the attestations, so that whatever else the
        # machine does meanwhile weighs on both alike.
        before = await _run_operation(bare, "ceiling", spec.seconds / 2, spec.bare_pids)
        results["attest"] = (await _run_operation(clients, "attest", spec.seconds,
                                                  spec.server_pids)).as_json()
        after = await _run_operation(bare, "ceiling", spec.seconds / 2, spec.bare_pids)
        results["ceiling"] = before.merged(after).as_json()
        tokens = await asyncio.gather(*(client.attest() for client in clients))
        for client, token in zip(clients, tokens, strict=True):
            client.token = token
        results["tag"] = (await _run_operation(clients, "tag", spec.seconds)).as_json()
        results["commit"] = (await _run_operation(clients, "commit", spec.seconds)).as_json()
    finally:
        await asyncio.gather(*(client.http.close() for client in [*clients, *bare]))
    return results


def run_load(spec: LoadSpec) -> dict[str, Any]:
    """The load process's entry point: every operation in turn against ``spec.urls``."""
    return asyncio.run(_drive(spec))


# -- PostgreSQL and CAS servers (in the main process) -------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def child_environment(home: Path) -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home),
            "LANG": "C.UTF-8", "TDAPP_HOME": str(home), "PYTHONUNBUFFERED": "1"}


class Postgres:
    """A PostgreSQL 15 server of our own: trust authentication, TCP on 127.0.0.1."""

    def __init__(self, root: Path) -> None:
        self.root, self.port = root, free_port()
        self.as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        self.started = False

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    def run(self, program: str, *args: str, timeout: float = 120) -> None:
        done = subprocess.run([*self.as_postgres, str(PG_BIN / program), *args],
                              capture_output=True, timeout=timeout, check=False,
                              stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            raise RuntimeError(f"{program} failed ({done.returncode}): "
                               f"{done.stderr.decode(errors='replace')[-400:]}")

    def start(self) -> None:
        (self.root / "sock").mkdir(parents=True, exist_ok=True)
        if self.as_postgres:
            for path in (self.root, self.root / "sock"):
                shutil.chown(path, "postgres", "postgres")
        self.run("initdb", "-D", str(self.data_dir), "-A", "trust", "-U", "postgres",
                 "--no-sync", "-E", "UTF8")
        options = (f"-p {self.port} -k {self.root / 'sock'} -c listen_addresses={HOST} "
                   f"-c max_connections=200")
        self.started = True
        self.run("pg_ctl", "-D", str(self.data_dir), "-l", str(self.root / "server.log"),
                 "-o", options, "-w", "-t", "60", "start")

    def create_database(self, name: str) -> str:
        self.run("createdb", "-h", HOST, "-p", str(self.port), "-U", "postgres", name)
        return f"postgresql://postgres@{HOST}:{self.port}/{name}"

    def stop(self) -> None:
        if self.started:
            self.started = False
            try:
                self.run("pg_ctl", "-D", str(self.data_dir), "stop", "-m", "fast")
            except (RuntimeError, subprocess.TimeoutExpired) as error:
                log(f"stopping PostgreSQL: {error}")


class CasProcess:
    """One ``python -m tdapp cas serve --debug`` child process."""

    def __init__(self, root: Path, state_dir: Path, db: str | None, extra: list[str]) -> None:
        self.home, self.state_dir, self.db = root / "home", state_dir, db
        self.port, self.log_path, self.extra = free_port(), root / "cas.log", extra
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"https://{HOST}:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def command(self) -> list[str]:
        command = [sys.executable, "-m", "tdapp", "cas", "serve", "--host", HOST, "--port",
                   str(self.port), "--state-dir", str(self.state_dir), "--debug", *self.extra]
        return command + (["--db", self.db] if self.db else [])

    def start(self) -> None:
        self.home.mkdir(mode=0o700, parents=True, exist_ok=True)
        command = self.command()
        with self.log_path.open("ab") as output:
            self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=output,
                                            stderr=output, env=child_environment(self.home),
                                            start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _accepts_tls(self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                tail = self.log_path.read_text(errors="replace")[-600:]
                raise RuntimeError(f"the CAS on port {self.port} did not start:\n{tail}")
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


class BareProcess(CasProcess):
    """``benchmarks/cas_bare.py``: the CAS's stack on the CAS's state folder, no work."""

    def __init__(self, root: Path, state_dir: Path, workers: int) -> None:
        super().__init__(root, state_dir, None, [])
        self.log_path, self.workers = root / "bare.log", workers

    def command(self) -> list[str]:
        return [sys.executable, str(BENCH_DIR / "cas_bare.py"), "--host", HOST, "--port",
                str(self.port), "--state-dir", str(self.state_dir), "--workers",
                str(self.workers)]


def _accepts_tls(port: int) -> bool:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection((HOST, port), timeout=2) as raw, \
                context.wrap_socket(raw, server_hostname=HOST):
            return True
    except OSError:
        return False


def certify_identity(home: Path, cas: CasProcess) -> tuple[Path, Path]:
    """A tdapp identity in ``home`` certified by ``cas``: (its key, the CAS-issued cert)."""
    from tdapp.client.cas_client import CasClient
    from tdapp.client.pins import PinStore
    from tdapp.core.address import Address
    from tdapp.tls import fingerprint

    home.mkdir(mode=0o700, parents=True)
    previous = os.environ.get("TDAPP_HOME")
    os.environ["TDAPP_HOME"] = str(home)
    try:
        certificate = x509.load_pem_x509_certificate((cas.state_dir / "cas.crt").read_bytes())
        address = Address(HOST, cas.port)
        PinStore().pin(address, certificate)
        CasClient.connect(address)
    finally:
        if previous is None:
            os.environ.pop("TDAPP_HOME", None)
        else:
            os.environ["TDAPP_HOME"] = previous
    issued = home / "identity" / "cas" / f"{fingerprint(certificate)}.crt"
    if not issued.is_file():
        raise RuntimeError(f"the CAS did not certify the identity ({issued} is missing)")
    return home / "identity" / "client.key", issued


# -- one set-up ---------------------------------------------------------------------------------


def measure_setup(setup: str, root: Path, postgres: Postgres | None, clients: int,
                  seconds: float, extra: list[str], workers: int) -> dict[str, Any]:
    work = root / setup
    work.mkdir()
    state = work / "state"
    servers: list[CasProcess] = []
    extra = [*extra, "--workers", str(workers)]
    try:
        if setup == "sqlite":
            servers.append(CasProcess(work / "cas0", state, None, extra))
        else:
            assert postgres is not None
            url = postgres.create_database(f"cas_{setup}")
            count = 2 if setup == "replicas" else 1
            servers += [CasProcess(work / f"cas{i}", state, url, extra) for i in range(count)]
        for server in servers:  # one after the other: the first makes the shared state
            server.start()
        # The ceiling: as many bare-stack processes as the set-up has CAS processes.
        bare = BareProcess(work / "bare", state, workers * len(servers))
        bare.start()
        servers.append(bare)
        log(f"{setup}: {len(servers) - 1} CAS(es) x {workers} worker(s) on ports "
            f"{[s.port for s in servers[:-1]]}; bare stack on {bare.port}")
        key, certificate = certify_identity(work / "client-home", servers[0])
        spec = LoadSpec(tuple(server.url for server in servers[:-1]), (bare.url,),
                        str(state / "cas.crt"), str(certificate), str(key), clients, seconds,
                        tuple(server.pid for server in servers[:-1]), (bare.pid,))
        log(f"{setup}: {clients} clients, {seconds:g} s per operation "
            f"({', '.join(OPERATIONS)})")
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            figures = pool.submit(run_load, spec).result(timeout=6 * seconds + 300)
        ceiling = figures["ceiling"]["ops_per_s"]
        figures["attest_share_of_ceiling_percent"] = (
            round(100 * figures["attest"]["ops_per_s"] / ceiling, 1) if ceiling else None)
        for operation in (*OPERATIONS, "ceiling"):
            entry = figures[operation]
            log(f"  {setup}/{operation}: {entry['ops_per_s']:.0f}/s, p50 {entry['p50_ms']} ms, "
                f"p99 {entry['p99_ms']} ms, {entry['errors']} errors")
        return figures
    finally:
        for server in servers:
            server.stop()


# -- report -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    key: str
    label: str
    value: float | None
    limit: float
    sign: str  # ">=", "<" or "<="

    @property
    def met(self) -> bool | None:
        if self.value is None:
            return None
        return {">=": self.value >= self.limit, "<": self.value < self.limit,
                "<=": self.value <= self.limit}[self.sign]

    def line(self) -> str:
        sign = self.sign
        shown = "—" if self.value is None else f"{self.value:,.1f}"
        verdict = {True: "met", False: "NOT MET", None: "not measured"}[self.met]
        return f"  {self.label:40s} {shown:>10s}  (target {sign} {self.limit:g})  {verdict}"


def targets(results: dict[str, Any], clients: int) -> list[Target]:
    checks: list[Target] = []
    for setup, figures in results.items():
        if "skipped" in figures:
            continue
        if clients == TARGET_CLIENTS:
            checks.append(Target(f"{setup}_attest_share_of_ceiling_ge_25pct",
                                 f"{setup}: attestations, % of bare stack",
                                 figures["attest_share_of_ceiling_percent"],
                                 TARGET_SHARE_PERCENT, ">="))
            checks.append(Target(f"{setup}_attest_p99_le_50ms", f"{setup}: attest p99 ms",
                                 figures["attest"]["p99_ms"], TARGET_ATTEST_P99_MS, "<="))
            checks += [Target(f"{setup}_{op}_p99_lt_100ms", f"{setup}: {op} p99 ms",
                              figures[op]["p99_ms"], TARGET_P99_MS, "<")
                       for op in OPERATIONS if op != "attest"]
        checks += [Target(f"{setup}_{op}_zero_errors", f"{setup}: {op} errors",
                          float(figures[op]["errors"]), 1, "<")
                   for op in (*OPERATIONS, "ceiling")]
    return checks


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value:,.1f}"


def _cpu(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def print_report(console: Console, results: dict[str, Any], checks: list[Target],
                 clients: int, seconds: float) -> None:
    table = Table(title=f"CAS load ({clients} clients, {seconds:g} s per operation, "
                        "loopback, --debug / sim evidence)")
    for header in ("set-up", "operation", "ops", "ops/s", "p50 ms", "p99 ms", "errors",
                   "load CPU %", "note"):
        table.add_column(header, justify="left" if header in ("set-up", "operation", "note")
                         else "right")
    for setup, figures in results.items():
        if "skipped" in figures:
            table.add_row(setup, "—", "", "", "", "", "", "", figures["skipped"][:80],
                          end_section=True)
            continue
        for operation in (*OPERATIONS, "ceiling"):
            entry = figures[operation]
            label = "bare stack" if operation == "ceiling" else operation
            table.add_row(setup, label, f"{entry['ops']:,}", f"{entry['ops_per_s']:,.0f}",
                          _ms(entry["p50_ms"]), _ms(entry["p99_ms"]), str(entry["errors"]),
                          f"{entry['load_cpu_percent']:.0f}",
                          "; ".join(entry["error_samples"])[:80],
                          end_section=operation == "ceiling")
    console.print(table)
    for setup, figures in results.items():
        tag, commit = figures.get("tag", {}), figures.get("commit", {})
        if tag.get("p50_ms") and commit.get("p50_ms"):
            console.print(f"{setup}: a run's commit with its receipt takes "
                          f"{commit['p50_ms'] / tag['p50_ms']:.2f}x one tag update (p50; "
                          "commit ops/s include each op's untimed attestation)")
        if figures.get("attest_share_of_ceiling_percent") is not None:
            console.print(f"{setup}: {figures['attest']['ops_per_s']:,.0f} attestations/s = "
                          f"{figures['attest_share_of_ceiling_percent']:.1f} % of the bare "
                          f"stack's {figures['ceiling']['ops_per_s']:,.0f}/s (same clients, "
                          "same run); server CPU per operation: CAS "
                          f"{_cpu(figures['attest']['server_cpu_ms_per_op'])} ms, bare stack "
                          f"{_cpu(figures['ceiling']['server_cpu_ms_per_op'])} ms")
    console.print("Targets (share of the bare stack and p99 only judged at 32 clients):")
    for check in checks:
        console.print(check.line())


# -- main ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="3 s and 8 clients")
    parser.add_argument("--clients", type=int, default=None, help="concurrent clients (32)")
    parser.add_argument("--seconds", type=float, default=None,
                        help="seconds per operation per set-up (10)")
    parser.add_argument("--only", choices=SETUPS, action="append",
                        help="measure this set-up (repeatable; default all)")
    parser.add_argument("--workers", type=int, default=DEFAULT_WORKERS,
                        help="tdapp cas serve --workers for each CAS, and as many bare-stack "
                             f"processes ({DEFAULT_WORKERS})")
    parser.add_argument("--rate-limit", type=float, default=None,
                        help="pass --rate-limit to the CAS (default: the CAS's own)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    args = parse_args(argv)
    clients = args.clients or (8 if args.quick else TARGET_CLIENTS)
    seconds = args.seconds or (3.0 if args.quick else 10.0)
    extra = [] if args.rate_limit is None else ["--rate-limit", str(args.rate_limit)]
    setups = [setup for setup in SETUPS if not args.only or setup in args.only]
    results: dict[str, Any] = {}
    root = Path(tempfile.mkdtemp(prefix="tdapp-cas-load-"))
    postgres: Postgres | None = None
    try:
        if any(setup != "sqlite" for setup in setups):
            # Not under ``root`` (mode 0700, ours): user postgres must reach its folder.
            postgres = Postgres(Path(tempfile.mkdtemp(prefix="tdapp-cas-load-pg-")))
            try:
                postgres.start()
                log(f"PostgreSQL 15 on port {postgres.port}")
            except (RuntimeError, OSError, subprocess.TimeoutExpired) as error:
                log(f"PostgreSQL could not start: {error}")
                postgres.stop()
                shutil.rmtree(postgres.root, ignore_errors=True)
                postgres = None
                for setup in setups:
                    if setup != "sqlite":
                        results[setup] = {"skipped": f"PostgreSQL: {error}"[:200]}
        for setup in setups:
            if setup in results:
                continue
            try:
                results[setup] = measure_setup(setup, root, postgres, clients, seconds, extra,
                                               args.workers)
            except Exception as error:  # one broken set-up must not stop the others
                log(f"{setup}: FAILED: {error}")
                results[setup] = {"skipped": f"failed: {error}"[:300]}
    finally:
        if postgres is not None:
            postgres.stop()
            shutil.rmtree(postgres.root, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)
    results = {setup: results[setup] for setup in setups if setup in results}
    elapsed = time.perf_counter() - started
    log(f"done in {elapsed:.0f} s")
    checks = targets(results, clients)
    console = Console(file=sys.stdout, width=160, highlight=False, soft_wrap=False)
    print_report(console, results, checks, clients, seconds)
    sys.stdout.flush()
    values = [check.met for check in checks]
    document = {
        "benchmark": "cas_load", "quick": bool(args.quick), "clients": clients,
        "seconds_per_operation": seconds, "cpu_count": os.cpu_count(),
        "workers": args.workers,
        "targets": {"attest_share_of_ceiling_percent_min": TARGET_SHARE_PERCENT,
                    "attest_p99_ms_max": TARGET_ATTEST_P99_MS,
                    "other_p99_ms_below": TARGET_P99_MS, "at_clients": TARGET_CLIENTS,
                    "errors": 0},
        **results,
        "targets_met": {check.key: check.met for check in checks},
        "all_targets_met": False if False in values else (None if None in values or not values
                                                          else True),
        "elapsed_s": round(elapsed, 1),
    }
    print(json.dumps(document))
    return 0


if __name__ == "__main__":
    sys.exit(main())

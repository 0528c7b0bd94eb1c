"""``tdapp up``: a debug CAS, a LAS and a transfer service in one process (laptop or test).

Takes its three ports first, then the ``$TDAPP_HOME/up.lock`` lock (one
``tdapp up`` per home), and only then creates or opens any state and writes
``up.json``; so a second ``tdapp up`` that cannot start changes nothing of a
running one. Must never remove an ``up.json`` it did not write.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import click

from tdapp.cli.transfer import TransferServiceOptions, transfer_service_options
from tdapp.errors import ConflictError, UnavailableError, UsageError
from tdapp.home import tdapp_home

LOCK_FILE = "up.lock"


@dataclass(frozen=True)
class _Port:
    service: str
    option: str
    number: int


@dataclass(frozen=True)
class _Bound:
    host: str
    cas: socket.socket
    las: socket.socket
    transfer: socket.socket

    def port(self, bound: socket.socket) -> int:
        return int(bound.getsockname()[1])

    def close(self) -> None:
        for bound in (self.cas, self.las, self.transfer):
            bound.close()


@click.command()
@click.option("--state-dir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Where the services keep their state (default: $TDAPP_HOME).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="The address the three services listen on (and announce).")
@click.option("--cas-port", default=8081, show_default=True)
@click.option("--las-port", default=18766, show_default=True)
@click.option("--transfer-port", default=8090, show_default=True)
@click.option("--max-upload", "--max-size", "max_upload", default=1 << 30, show_default=True,
              type=click.IntRange(1),
              help="Largest bundle the transfer service accepts, in bytes.")
@transfer_service_options
@click.option("--workers", default=0, show_default=True, type=click.IntRange(0, 16),
              help="Also start a Redis (redis-server, append-only) and this many sim workers "
                   "of the pool, so tdapp submit works at once (docs/pool.md).")
def up(state_dir: Path | None, host: str, cas_port: int, las_port: int,
       transfer_port: int, max_upload: int, service: TransferServiceOptions,
       workers: int) -> None:
    """Run CAS (debug mode), LAS and transfer service until Ctrl-C; pin the CAS for this user.

    The transfer service takes the options of tdapp transfer serve (--s3, --keep, --quota,
    --upload-token-file); its folder store is STATE_DIR/transfer.
    """
    service.check_host(host)
    if workers and shutil.which("redis-server") is None:
        raise UsageError("--workers needs redis-server (Debian: apt-get install redis-server)")
    sockets = _take_ports(host, [_Port("CAS", "--cas-port", cas_port),
                                 _Port("LAS", "--las-port", las_port),
                                 _Port("transfer service", "--transfer-port", transfer_port)])
    bound = _Bound(host, *sockets)
    try:
        lock = _lock_home()
        try:
            asyncio.run(_serve(state_dir or tdapp_home(), bound, max_upload, service, workers))
        finally:
            os.close(lock)
    finally:
        bound.close()


def _take_ports(host: str, ports: list[_Port]) -> list[socket.socket]:
    """Bind and listen on every port, or on none (one line naming the port that failed)."""
    taken: list[socket.socket] = []
    try:
        for port in ports:
            taken.append(_listen(host, port))
    except BaseException:
        for bound in taken:
            bound.close()
        raise
    return taken


def _listen(host: str, port: _Port) -> socket.socket:
    try:
        family, kind, protocol, _, address = socket.getaddrinfo(
            host, port.number, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError) as error:
        raise UsageError(f"--host {host}: {error}") from None
    listening = socket.socket(family, kind, protocol)
    try:
        listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listening.bind(address)
        listening.listen(128)
        listening.setblocking(False)
    except OSError as error:
        listening.close()
        hint = (f"; another program (perhaps another tdapp up) holds it: stop it or choose "
                f"another {port.option}" if error.errno == errno.EADDRINUSE else "")
        raise UnavailableError(f"cannot listen on {host}:{port.number} for the {port.service}: "
                               f"{error.strerror or error}{hint}") from None
    return listening


def _lock_home() -> int:
    """Hold ``$TDAPP_HOME/up.lock`` for the life of this process (the kernel drops it at exit)."""
    home = tdapp_home()
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(home / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConflictError(f"another tdapp up is already serving {home} (see {home}/up.json); "
                            "stop it first or use another TDAPP_HOME") from None
    return fd


async def _serve(state: Path, bound: _Bound, max_upload: int, service: TransferServiceOptions,
                 workers: int) -> None:
    from aiohttp import web
    from jwcrypto.jwk import JWK

    from tdapp.attest.las import build_las_app, platform_of
    from tdapp.cas.serve import build_app
    from tdapp.client.announce import Announcement, announce, withdraw
    from tdapp.client.pins import PinStore
    from tdapp.core.address import Address
    from tdapp.serving import serve_until_signalled
    from tdapp.transfer.lifecycle import describe_duration
    from tdapp.transfer.server import build_transfer_app, open_store

    host = bound.host
    las_port, transfer_port = bound.port(bound.las), bound.port(bound.transfer)
    # The bucket is checked first: a --s3 that cannot serve fails before any state is made.
    transfer_store = open_store(None, service.s3_url, root=state / "transfer")
    las_app = build_las_app(state / "las")
    # The debug CAS trusts this LAS, and only it, for sessions that name no platform.
    cas_app, materials, store = build_app(state_dir=state / "cas", db=None, hosts=(host,),
                                          debug=True,
                                          las_platforms=(platform_of(las_app).platform,))
    transfer_app = build_transfer_app(transfer_store, max_size=max_upload,
                                      public_url=f"http://{host}:{transfer_port}",
                                      keep=service.keep, quota=service.quota,
                                      upload_token_file=service.upload_token_file)
    cas = Address(host, bound.port(bound.cas))
    announcements: list[Announcement] = []
    pool = _Pool(state / "pool", host, f"{host}:{las_port}") if workers else None

    def started(_: list[web.AppRunner]) -> None:
        PinStore().pin(cas, materials.certificate)
        PinStore().pin_receipt_key(cas, JWK(**materials.receipt_signer.public_jwk()))
        addresses = {"cas": str(cas), "las": f"{host}:{las_port}",
                     "push": f"http://{host}:{transfer_port}/upload",
                     "cas_state": str((state / "cas").absolute())}
        if pool is not None:
            addresses["broker"] = pool.start(workers)
            click.echo(f"tdapp up: pool     {addresses['broker']}  {workers} sim worker(s)",
                       err=True)
        announcements.append(announce(addresses))
        click.echo(f"tdapp up: CAS (debug) https://{cas}  fingerprint {materials.fingerprint}\n"
                   f"tdapp up: LAS      http://{host}:{las_port}  platform "
                   f"{platform_of(las_app).platform}\n"
                   f"tdapp up: transfer http://{host}:{transfer_port}/upload  "
                   f"{transfer_store.description}, keep {describe_duration(service.keep)}\n"
                   "tdapp up: the CAS is pinned for this user; Ctrl-C stops all three",
                   err=True)

    try:
        await serve_until_signalled(
            [(cas_app, host, bound.cas, materials.server_context()),
             (las_app, host, bound.las, None), (transfer_app, host, bound.transfer, None)],
            started)
    finally:
        for announcement in announcements:
            withdraw(announcement)
        if pool is not None:
            pool.stop()
        store.close()
        click.echo("tdapp up: stopped", err=True)


class _Pool:
    """A Redis of this ``tdapp up`` (append-only, in its state folder) and its sim workers."""

    def __init__(self, folder: Path, host: str, las: str) -> None:
        self.folder, self.host, self.las = folder, host, las
        self.processes: list[subprocess.Popen[bytes]] = []

    def start(self, workers: int) -> str:
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        with socket.socket() as probe:
            probe.bind((self.host, 0))
            port = probe.getsockname()[1]
        log = (self.folder / "pool.log").open("ab")
        self.processes.append(subprocess.Popen(
            [str(shutil.which("redis-server")), "--port", str(port), "--bind", self.host,
             "--dir", str(self.folder), "--appendonly", "yes", "--save", ""],
            stdout=log, stderr=log, start_new_session=True))
        broker = f"redis://{self.host}:{port}/0"
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection((self.host, port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise UnavailableError("the pool's redis-server did not start (see "
                                           f"{self.folder / 'pool.log'})") from None
                time.sleep(0.05)
        for number in range(workers):
            self.processes.append(subprocess.Popen(
                [sys.executable, "-m", "tdapp", "worker", "--broker", broker, "--tee", "sim",
                 "--queue", "sim", "--las", self.las, "--concurrency", "1",
                 "--hostname", f"up{number}@%h"],
                stdout=log, stderr=log, start_new_session=True))
        return broker

    def stop(self) -> None:
        for process in reversed(self.processes):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in reversed(self.processes):
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)

"""Starting a CAS: state folder, keys, database, HTTPS listener.

The listener is :func:`tdapp.serving.serve_until_signalled`, so the CAS has the
same handshake, header and body timeouts as every tdapp service.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import socket
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from tdapp.attest import VerifierSettings
from tdapp.attest.dcap import collateral_from_file, collateral_from_pccs
from tdapp.attest.snp import AMD_ARK_SHA256S
from tdapp.cas.attestation import AttestationAuthority
from tdapp.cas.materials import CasMaterials
from tdapp.cas.metrics import CasMetrics
from tdapp.cas.nonces import NonceMinter
from tdapp.cas.ratelimit import RateLimit, WorkSlots
from tdapp.cas.server import create_app
from tdapp.cas.sessions import SessionAuthority, SessionDefaults
from tdapp.cas.store import Store, database_url
from tdapp.cas.workers import reuseport_sockets, run_workers
from tdapp.errors import InputError, TdappError, UsageError
from tdapp.home import tdapp_home
from tdapp.policy.security import AttestationMode
from tdapp.serving import ServerTimeouts, serve_until_signalled


def default_state_dir() -> Path:
    return tdapp_home() / "cas"


@dataclass(frozen=True)
class HardwareOptions:
    """Where hardware evidence's trust comes from (``tdapp cas serve`` options)."""

    collateral: Path | None = None
    pccs: str | None = None
    snp_ark: Path | None = None
    snp_ask: Path | None = None
    verify_at: float | None = None

    def settings(self) -> VerifierSettings:
        collateral = (collateral_from_file(self.collateral) if self.collateral is not None
                      else collateral_from_pccs(self.pccs) if self.pccs else None)
        certificates = {name: _read(path) for name, path in
                        (("ark", self.snp_ark), ("ask", self.snp_ask)) if path is not None}
        pins: tuple[str, ...] = AMD_ARK_SHA256S
        if "ark" in certificates:
            # An operator who names an ARK file trusts it: pin exactly that root.
            pins = (hashlib.sha256(certificates["ark"]).hexdigest(),)
        return VerifierSettings(collateral=collateral, snp_pinned_arks=pins,
                                snp_certificates=certificates)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise InputError(f"cannot read {path}: {error.strerror}") from None


def build_app(*, state_dir: Path, db: str | None, hosts: tuple[str, ...] = (),
              master_key_file: Path | None = None, debug: bool = False,
              las_platforms: tuple[str, ...] = (),
              rate_limit: float = 0, hardware: HardwareOptions | None = None,
              work_slots: WorkSlots | None = None
              ) -> tuple[web.Application, CasMaterials, Store]:
    hardware = hardware or HardwareOptions()
    verifiers = hardware.settings()
    materials = CasMaterials.load_or_create(state_dir, hosts=hosts,
                                            master_key_file=master_key_file)
    store = Store(database_url(db, state_dir))
    store.migrate()
    metrics = CasMetrics()
    store.refusal_listener = metrics.refused
    authority = SessionAuthority(store, materials.master_key,
                                 session_defaults(debug=debug, las_platforms=las_platforms))
    attestation = AttestationAuthority(store, authority, NonceMinter(materials.master_key),
                                       verifiers=verifiers,
                                       verify_at=hardware.verify_at,
                                       receipts=materials.receipt_signer)
    limiter = RateLimit(rate_limit) if rate_limit > 0 else None
    app = create_app(authority, attestation, materials, metrics, limiter, work_slots)
    return app, materials, store


def session_defaults(*, debug: bool, las_platforms: tuple[str, ...]) -> SessionDefaults:
    """What this CAS fixes in sessions that name no mode: ``hardware``, or on a debug CAS
    ``sim`` accepting only the LASes it was told to trust."""
    try:
        if debug:
            return SessionDefaults(AttestationMode.SIM, las_platforms)
        return SessionDefaults(AttestationMode.HARDWARE, las_platforms)
    except ValueError as error:
        raise UsageError(f"--las-platform: {error}") from None


def serve(*, host: str, port: int, db: str | None, state_dir: Path, debug: bool,
          las_platforms: tuple[str, ...] = (),
          master_key_file: Path | None = None, rate_limit: float = 0,
          hardware: HardwareOptions | None = None,
          timeouts: ServerTimeouts | None = None, workers: int = 1) -> None:
    """Run the CAS until SIGTERM/SIGINT: in this process, or in ``workers`` processes
    sharing the port (:mod:`tdapp.cas.workers`)."""
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    app_defaults = session_defaults(debug=debug, las_platforms=las_platforms)

    def build() -> tuple[web.Application, CasMaterials, Store]:
        return build_app(state_dir=state_dir, db=db, hosts=(host,),
                         master_key_file=master_key_file, debug=debug,
                         las_platforms=las_platforms, rate_limit=rate_limit, hardware=hardware)

    def banner(materials: CasMaterials, store_url: str, bound: int) -> None:
        print(f"tdapp CAS on https://{host}:{bound} "
              f"({'debug' if debug else 'production'} mode"
              f"{f', {workers} worker processes' if workers > 1 else ''})\n"
              f"  certificate {materials.certificate_path}\n"
              f"  fingerprint {materials.fingerprint}\n"
              f"  database    {store_url.split('@')[-1]}\n"
              f"  new sessions without a mode: {_describe_defaults(app_defaults)}",
              file=sys.stderr, flush=True)

    if workers == 1:
        app, materials, store = build()
        try:
            asyncio.run(_serve_app(app, host, port, materials,
                                   lambda: banner(materials, store.url, port), timeouts))
        finally:
            store.close()
        return
    # Keys, certificate and schema are made once, here, before any worker exists.
    materials = CasMaterials.load_or_create(state_dir, hosts=(host,),
                                            master_key_file=master_key_file)
    store = Store(database_url(db, state_dir))
    try:
        store.migrate()
    finally:
        store.close()
    sockets = reuseport_sockets(host, port, workers)
    bound = int(sockets[0].getsockname()[1])

    def worker(sock: socket.socket, _index: int, ready: Callable[[], None]) -> None:
        try:
            app, worker_materials, worker_store = build()
            try:
                asyncio.run(_serve_app(app, host, sock, worker_materials, ready, timeouts))
            finally:
                worker_store.close()
        except TdappError as error:
            print(f"tdapp: error: {error.message}", file=sys.stderr, flush=True)
            sys.exit(1)

    try:
        run_workers(sockets, worker, lambda: banner(materials, store.url, bound))
    finally:
        for sock in sockets:
            sock.close()


EXECUTOR_THREADS = 32
"""Threads for store work and judging: enough that requests waiting for a group commit
(tdapp.cas.batching) do not keep others from being judged meanwhile."""


async def _serve_app(app: web.Application, host: str, port: int | socket.socket,
                     materials: CasMaterials, started: Callable[[], None],
                     timeouts: ServerTimeouts | None) -> None:
    asyncio.get_running_loop().set_default_executor(
        ThreadPoolExecutor(EXECUTOR_THREADS, thread_name_prefix="tdapp-cas"))
    await serve_until_signalled([(app, host, port, materials.server_context())],
                                lambda _: started(), timeouts)


def _describe_defaults(defaults: SessionDefaults) -> str:
    match defaults.mode:
        case AttestationMode.SIM if defaults.platforms:
            return f"sim, from LAS platform {', '.join(p[:16] for p in defaults.platforms)}"
        case AttestationMode.SIM:
            return "sim, and they must name their platforms (no --las-platform given)"
        case _:
            return "hardware"

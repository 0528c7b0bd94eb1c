"""Starting a CAS: state folder, keys, database, HTTPS listener.

The listener is :func:`tdapp.serving.serve_until_signalled`, so the CAS has the
same handshake, header and body timeouts as every tdapp service.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import sys
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
from tdapp.errors import InputError, UsageError
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
          timeouts: ServerTimeouts | None = None) -> None:
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    app, materials, store = build_app(state_dir=state_dir, db=db, hosts=(host,),
                                      master_key_file=master_key_file, debug=debug,
                                      las_platforms=las_platforms,
                                      rate_limit=rate_limit, hardware=hardware)

    app_defaults = session_defaults(debug=debug, las_platforms=las_platforms)

    def started(_: list[web.AppRunner]) -> None:
        print(f"tdapp CAS on https://{host}:{port} "
              f"({'debug' if debug else 'production'} mode)\n"
              f"  certificate {materials.certificate_path}\n"
              f"  fingerprint {materials.fingerprint}\n"
              f"  database    {store.url.split('@')[-1]}\n"
              f"  new sessions without a mode: {_describe_defaults(app_defaults)}",
              file=sys.stderr, flush=True)

    try:
        asyncio.run(serve_until_signalled(
            [(app, host, port, materials.server_context())], started, timeouts))
    finally:
        store.close()


def _describe_defaults(defaults: SessionDefaults) -> str:
    match defaults.mode:
        case AttestationMode.SIM if defaults.platforms:
            return f"sim, from LAS platform {', '.join(p[:16] for p in defaults.platforms)}"
        case AttestationMode.SIM:
            return "sim, and they must name their platforms (no --las-platform given)"
        case _:
            return "hardware"

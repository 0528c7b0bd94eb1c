"""Starting a CAS: state folder, keys, database, HTTPS listener."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from aiohttp import web

from tdapp.cas.attestation import AttestationAuthority
from tdapp.cas.materials import CasMaterials
from tdapp.cas.metrics import CasMetrics
from tdapp.cas.nonces import NonceMinter
from tdapp.cas.ratelimit import RateLimit
from tdapp.cas.server import create_app
from tdapp.cas.sessions import SessionAuthority
from tdapp.cas.store import Store, database_url
from tdapp.home import tdapp_home


def default_state_dir() -> Path:
    return tdapp_home() / "cas"


def build_app(*, state_dir: Path, db: str | None, hosts: tuple[str, ...] = (),
              master_key_file: Path | None = None, debug: bool = False,
              rate_limit: float = 0) -> tuple[web.Application, CasMaterials, Store]:
    materials = CasMaterials.load_or_create(state_dir, hosts=hosts,
                                            master_key_file=master_key_file)
    store = Store(database_url(db, state_dir))
    store.migrate()
    metrics = CasMetrics()
    store.refusal_listener = metrics.refused
    authority = SessionAuthority(store, materials.master_key)
    attestation = AttestationAuthority(store, authority, NonceMinter(materials.master_key),
                                       debug=debug)
    limiter = RateLimit(rate_limit) if rate_limit > 0 else None
    return create_app(authority, attestation, materials, metrics, limiter), materials, store


def serve(*, host: str, port: int, db: str | None, state_dir: Path, debug: bool,
          master_key_file: Path | None = None, rate_limit: float = 0) -> None:
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    app, materials, store = build_app(state_dir=state_dir, db=db, hosts=(host,),
                                      master_key_file=master_key_file, debug=debug,
                                      rate_limit=rate_limit)
    print(f"tdapp CAS on https://{host}:{port} ({'debug' if debug else 'production'} mode)\n"
          f"  certificate {materials.certificate_path}\n"
          f"  fingerprint {materials.fingerprint}\n"
          f"  database    {store.url.split('@')[-1]}", file=sys.stderr, flush=True)
    try:
        web.run_app(app, host=host, port=port, ssl_context=materials.server_context(),
                    print=None, access_log=None, handle_signals=True)
    finally:
        store.close()

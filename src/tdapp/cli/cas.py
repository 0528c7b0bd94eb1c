"""``tdapp cas …`` (run and pin a CAS) and ``tdapp self show`` (the local identity)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from tdapp.cli.options import server_timeouts
from tdapp.client.cas_client import CasClient
from tdapp.client.identity import ClientIdentity
from tdapp.client.pins import DEFAULT_CAS, PinStore, fetch_presented_certificate
from tdapp.client.receipts import pin_receipt_key
from tdapp.core.address import Address
from tdapp.errors import RefusedError
from tdapp.tls import fingerprint

if TYPE_CHECKING:
    from tdapp.serving import ServerTimeouts


@click.group()
def cas() -> None:
    """The configuration and attestation service (CAS)."""


@cas.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8081, show_default=True, type=click.IntRange(0, 65535))
@click.option("--db", default=None, metavar="URL",
              help="postgresql://… or sqlite:///… (default: SQLite in the state folder).")
@click.option("--state-dir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Keys, certificate and SQLite database (default: $TDAPP_HOME/cas).")
@click.option("--master-key-file", type=click.Path(path_type=Path, dir_okay=False),
              default=None, help="The master key sealing secrets (default: STATE_DIR/master.key).")
@click.option("--debug", is_flag=True,
              help="Debug CAS: a session created without an attestation mode is made 'sim' "
                   "(accepting the --las-platform LASes), not 'hardware'. Stored sessions "
                   "keep their mode.")
@click.option("--las-platform", "las_platforms", multiple=True, metavar="ID",
              help="A LAS platform id (tdapp las platform prints it) this CAS writes into "
                   "sim sessions that name no platforms. Repeatable.")
@click.option("--rate-limit", default=2000.0, show_default=True, type=click.FloatRange(0),
              help="Requests per second per client address (burst: twice that); 0: no limit.")
@click.option("--collateral", type=click.Path(path_type=Path, dir_okay=False, exists=True),
              default=None, help="DCAP collateral (QuoteCollateralV3 JSON) for SGX/TDX quotes "
                                 "that carry none.")
@click.option("--pccs", metavar="URL", default=None,
              help="Fetch DCAP collateral from this PCCS when a quote carries none.")
@click.option("--snp-ark", type=click.Path(path_type=Path, dir_okay=False, exists=True),
              default=None, help="Trust exactly this root key (DER) for SEV-SNP, instead of "
                                 "the built-in AMD Milan and Genoa ARK pins.")
@click.option("--snp-ask", type=click.Path(path_type=Path, dir_okay=False, exists=True),
              default=None, help="AMD ASK (DER) for SEV-SNP reports that carry none.")
@click.option("--verify-at", type=float, default=None, metavar="UNIX_TIME",
              help="Verify hardware evidence as of this time instead of now (to replay "
                   "recorded evidence; never in production).")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 64),
              help="CAS processes sharing the port (SO_REUSEPORT); each has its own rate "
                   "limits and metrics (docs/operations.md, 'Several CAS processes').")
@server_timeouts(header_help="Close a connection whose TLS handshake or request headers "
                             "take longer.")
def serve(host: str, port: int, db: str | None, state_dir: Path | None, debug: bool,
          las_platforms: tuple[str, ...], master_key_file: Path | None, rate_limit: float,
          collateral: Path | None, pccs: str | None, snp_ark: Path | None,
          snp_ask: Path | None, verify_at: float | None, workers: int,
          timeouts: ServerTimeouts) -> None:
    """Run the CAS over HTTPS (its key and certificate are made on first start and kept)."""
    # Imported here: the server stack (aiohttp, SQLAlchemy, Alembic) would slow every command.
    from tdapp.cas.serve import HardwareOptions, default_state_dir
    from tdapp.cas.serve import serve as run

    run(host=host, port=port, db=db, state_dir=state_dir or default_state_dir(), debug=debug,
        las_platforms=las_platforms, master_key_file=master_key_file, rate_limit=rate_limit,
        hardware=HardwareOptions(collateral, pccs, snp_ark, snp_ask, verify_at),
        timeouts=timeouts, workers=workers)


@cas.command()
@click.option("--session", "session_name", default=None, help="Only this session's events.")
@click.option("--db", default=None, metavar="URL", help="As given to 'tdapp cas serve'.")
@click.option("--state-dir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="As given to 'tdapp cas serve' (default: $TDAPP_HOME/cas).")
@click.option("--limit", default=1000, show_default=True, type=click.IntRange(1, 1_000_000))
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def audit(session_name: str | None, db: str | None, state_dir: Path | None, limit: int,
          as_json: bool) -> None:
    """Print the CAS's audit log from its database (for the CAS's operator)."""
    import json
    import time

    from tdapp.cas.serve import default_state_dir
    from tdapp.cas.store import Store, database_url
    from tdapp.client.announce import announced_state
    from tdapp.errors import InputError

    folder = state_dir or announced_state("cas") or default_state_dir()
    url = database_url(db, folder)
    if db is None and not (folder / "cas.db").is_file():
        raise InputError(f"no CAS database at {folder / 'cas.db'}: give the CAS's --state-dir "
                         "(tdapp up keeps it in STATE/cas) or its --db")
    store = Store(url)
    try:
        events = store.audit_events(session_name, limit=limit)
    finally:
        store.close()
    for event in events:
        if as_json:
            click.echo(json.dumps(event.as_json()))
            continue
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(event.at))
        click.echo(f"{when} {event.outcome:<8} {event.event:<16} session={event.session or '-'}"
                   f" actor={event.actor or '-'} {event.reason}")


@cas.command()
@click.argument("address", default=DEFAULT_CAS, metavar="HOST:PORT")
@click.option("--accept", "accepted", metavar="FINGERPRINT",
              help="Pin the CAS only if its certificate has this SHA-256 fingerprint.")
def attest(address: str, accepted: str | None) -> None:
    """Show the CAS's certificate fingerprint and pin it for this user."""
    where = Address.parse(address)
    presented = fetch_presented_certificate(where)
    actual = fingerprint(presented)
    pins = PinStore()
    pinned = pins.get(where)
    wanted = (accepted or "").replace(":", "").lower()
    if wanted and wanted != actual:
        raise RefusedError(
            f"the CAS at {where} presents certificate {actual}, not the accepted {wanted}; "
            "nothing was pinned")
    if pinned is not None and fingerprint(pinned) != actual and not wanted:
        raise RefusedError(
            f"the CAS at {where} presents {actual}, but {fingerprint(pinned)} is pinned; "
            f"if the change is expected, run: tdapp cas attest {where} --accept {actual}")
    if pinned is None or fingerprint(pinned) != actual:
        if not wanted and sys.stdin.isatty():
            click.echo(f"CAS {where} presents certificate {actual}", err=True)
            if not click.confirm(f"Pin {actual} for {where}?", err=True):
                raise RefusedError(f"the CAS at {where} was not pinned")
            wanted = actual
        if not wanted:
            raise RefusedError(
                f"the CAS at {where} presents certificate {actual}; compare it with the "
                f"fingerprint the CAS printed at start and pass --accept {actual}")
        pins.pin(where, presented)
    client = CasClient.connect(where)  # certifies this user's identity at that CAS
    # Receipts verify offline against the key this pinned connection vouches for.
    pin_receipt_key(client, where, replace=bool(wanted))
    click.echo(actual)


@click.group(name="self")
def self_group() -> None:
    """This user's identity (a key pair; its public-key hash is the identity)."""


@self_group.command()
@click.option("--json", "as_json", is_flag=True,
              help="{\"identity\", \"key\", \"certificate\", \"cas_certificates\"}.")
def show(as_json: bool) -> None:
    """Print the identity (creating it on first use) and its certificate paths."""
    identity = ClientIdentity.load_or_create()
    if as_json:
        click.echo(json.dumps({"identity": identity.identity, "key": str(identity.key_path),
                               "certificate": str(identity.certificate_path),
                               "cas_certificates": [str(path) for path in
                                                    identity.cas_certificates()]}))
        return
    click.echo(f"identity     {identity.identity}")
    click.echo(f"key          {identity.key_path}")
    click.echo(f"certificate  {identity.certificate_path}")
    for path in identity.cas_certificates():
        click.echo(f"certified by CAS {path.stem}: {path}")

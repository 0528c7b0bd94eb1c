"""``tdapp up``: a debug CAS, a LAS and a transfer service in one process (laptop or test)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import click

from tdapp.home import tdapp_home


@click.command()
@click.option("--state-dir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Where the services keep their state (default: $TDAPP_HOME).")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--cas-port", default=8081, show_default=True)
@click.option("--las-port", default=18766, show_default=True)
@click.option("--transfer-port", default=8090, show_default=True)
@click.option("--max-upload", default=1 << 30, show_default=True, type=click.IntRange(1),
              help="Largest bundle the transfer service accepts, in bytes.")
def up(state_dir: Path | None, host: str, cas_port: int, las_port: int,
       transfer_port: int, max_upload: int) -> None:
    """Run CAS (debug mode), LAS and transfer service until Ctrl-C; pin the CAS for this user."""
    asyncio.run(_serve(state_dir or tdapp_home(), host, cas_port, las_port, transfer_port,
                       max_upload))


async def _serve(state: Path, host: str, cas_port: int, las_port: int,
                 transfer_port: int, max_upload: int) -> None:
    from aiohttp import web

    from tdapp.attest.las import build_las_app, platform_of
    from tdapp.cas.serve import build_app
    from tdapp.client.announce import announce, withdraw
    from tdapp.client.pins import PinStore
    from tdapp.core.address import Address
    from tdapp.serving import serve_until_signalled
    from tdapp.transfer.server import build_transfer_app

    cas_app, materials, store = build_app(state_dir=state / "cas", db=None, hosts=(host,),
                                          debug=True)
    las_app = build_las_app(state / "las")
    transfer_app = build_transfer_app(state / "transfer", max_size=max_upload,
                                      public_url=f"http://{host}:{transfer_port}")
    cas = Address(host, cas_port)

    def started(_: list[web.AppRunner]) -> None:
        PinStore().pin(cas, materials.certificate)
        announce({"cas": str(cas), "las": f"{host}:{las_port}",
                  "push": f"http://{host}:{transfer_port}/upload"})
        click.echo(f"tdapp up: CAS (debug) https://{cas}  fingerprint {materials.fingerprint}\n"
                   f"tdapp up: LAS      http://{host}:{las_port}  platform "
                   f"{platform_of(las_app).platform}\n"
                   f"tdapp up: transfer http://{host}:{transfer_port}/upload\n"
                   "tdapp up: the CAS is pinned for this user; Ctrl-C stops all three",
                   err=True)

    try:
        await serve_until_signalled(
            [(cas_app, host, cas_port, materials.server_context()),
             (las_app, host, las_port, None), (transfer_app, host, transfer_port, None)],
            started)
    finally:
        withdraw()
        store.close()
        click.echo("tdapp up: stopped", err=True)

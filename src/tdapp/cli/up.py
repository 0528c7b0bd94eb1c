"""``tdapp up``: a debug CAS, a LAS and a transfer service in one process (laptop or test)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
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
def up(state_dir: Path | None, host: str, cas_port: int, las_port: int,
       transfer_port: int) -> None:
    """Run CAS (debug mode), LAS and transfer service until Ctrl-C; pin the CAS for this user."""
    asyncio.run(_serve(state_dir or tdapp_home(), host, cas_port, las_port, transfer_port))


async def _serve(state: Path, host: str, cas_port: int, las_port: int,
                 transfer_port: int) -> None:
    from aiohttp import web

    from tdapp.attest.las import build_las_app, platform_of
    from tdapp.cas.serve import build_app
    from tdapp.client.announce import announce, withdraw
    from tdapp.client.cas_client import CasClient
    from tdapp.client.pins import Address, PinStore
    from tdapp.transfer.server import build_transfer_app

    cas_app, materials, store = build_app(state_dir=state / "cas", db=None, hosts=(host,),
                                          debug=True)
    las_app = build_las_app(state / "las")
    transfer_app = build_transfer_app(state / "transfer",
                                      public_url=f"http://{host}:{transfer_port}")
    runners = []
    try:
        for app, port, context in ((cas_app, cas_port, materials.server_context()),
                                   (las_app, las_port, None), (transfer_app, transfer_port, None)):
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            await web.TCPSite(runner, host, port, ssl_context=context).start()
            runners.append(runner)
        cas = Address(host, cas_port)
        PinStore().pin(cas, materials.certificate)
        await asyncio.to_thread(CasClient.connect, cas)
        announce({"cas": str(cas), "las": f"{host}:{las_port}",
                  "push": f"http://{host}:{transfer_port}/upload"})
        click.echo(f"tdapp up: CAS (debug) https://{cas}  fingerprint {materials.fingerprint}\n"
                   f"tdapp up: LAS      http://{host}:{las_port}  platform "
                   f"{platform_of(las_app).platform}\n"
                   f"tdapp up: transfer http://{host}:{transfer_port}/upload\n"
                   "tdapp up: the CAS is pinned for this user; Ctrl-C stops all three",
                   err=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
    finally:
        withdraw()
        for runner in reversed(runners):
            with contextlib.suppress(Exception):
                await runner.cleanup()
        store.close()
        click.echo("tdapp up: stopped", err=True)

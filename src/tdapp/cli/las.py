"""``tdapp las …``: run the simulated local attestation service (LAS)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from tdapp.cli.options import server_timeouts

if TYPE_CHECKING:
    from tdapp.serving import ServerTimeouts


@click.group()
def las() -> None:
    """The local attestation service (LAS), simulated: signs 'sim' evidence."""


@las.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Loopback only, unless --allow-remote is given.")
@click.option("--port", default=18766, show_default=True, type=click.IntRange(0, 65535))
@click.option("--state-dir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Where the platform key is kept (default: $TDAPP_HOME/las).")
@click.option("--allow-remote", is_flag=True,
              help="Listen on a non-loopback address. A simulated LAS signs evidence for any "
                   "measurement it is asked for, so whoever reaches it can pass 'sim' "
                   "attestation. Without it the LAS answers only connections from the "
                   "uid running it; with it, anyone who can connect.")
@server_timeouts()
def serve(host: str, port: int, state_dir: Path | None, allow_remote: bool,
          timeouts: ServerTimeouts) -> None:
    """Run the simulated LAS over plain HTTP; print its platform id at start.

    Its platform key is made on first start (STATE_DIR/platform.key, mode 0600)
    and kept, so the platform id stays the same. A simulated LAS signs whatever
    it is asked: its evidence protects nothing against this host's root and is
    for development only.
    """
    # Imported here: aiohttp would slow every other command.
    from tdapp.attest.las import default_state_dir
    from tdapp.attest.las import serve as run

    run(host=host, port=port, state_dir=state_dir or default_state_dir(),
        allow_remote=allow_remote, timeouts=timeouts)


@las.command()
@click.option("--las", "las_address", default=None, metavar="HOST:PORT",
              help="The LAS (default: the one tdapp up announced, else 127.0.0.1:18766).")
def platform(las_address: str | None) -> None:
    """Print the LAS's platform id: what a sim session names in
    security.attestation.platforms to accept this LAS's evidence."""
    from tdapp.attest.las import LasClient
    from tdapp.client.announce import announced

    click.echo(LasClient(announced("las", las_address, "--las")).platform()["platform"])

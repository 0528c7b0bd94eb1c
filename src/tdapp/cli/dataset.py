"""``tdapp dataset push``: a data owner's folder, sealed as one volume in a session of its own."""

from __future__ import annotations

from pathlib import Path

import click

from tdapp.client.announce import announced
from tdapp.core.address import Address


@click.group()
def dataset() -> None:
    """Datasets: a volume in a session of its own, exported to the sessions that may use it."""


@dataset.command()
@click.argument("inputs", type=click.Path(path_type=Path, file_okay=False))
@click.option("--volume", "volume_name", default="dataset", show_default=True,
              help="The volume's name (an importing session mounts it under this name).")
@click.option("--export-to", "exports", multiple=True, metavar="SESSION[@HASH]",
              help="A session that may import the volume (pinned to its hash with @HASH); "
                   "repeatable. Add one later with tdapp session export.")
@click.option("--conf", type=click.Path(path_type=Path, file_okay=False), default=Path("KEYS"),
              show_default=True, help="Where the volume's key is kept (KEYS/datasets/).")
@click.option("--cas", "-s", "cas_address", default=None, metavar="HOST:PORT",
              help="The CAS (default: the one tdapp up announced, else 127.0.0.1:8081).")
@click.option("--push", default=None, metavar="URL",
              help="Upload URL (default: the transfer service tdapp up announced).")
def push(inputs: Path, volume_name: str, exports: tuple[str, ...], conf: Path,
         cas_address: str | None, push: str | None) -> None:
    """Seal INPUTS, create its session, upload; print the session, its hash and the URL."""
    from tdapp.client.sharing import ExportTo, push_dataset

    result = push_dataset(inputs=inputs, volume=volume_name, conf=conf,
                          cas=Address.parse(cas_address or announced("cas")),
                          push=push or announced("push"),
                          exports=tuple(ExportTo.parse(text) for text in exports))
    click.echo(f"session {result.session}\nhash {result.hash}\nvolume {result.volume}\n"
               f"url {result.url}")
    click.echo(f"the volume's key is kept in {result.keys_file}", err=True)

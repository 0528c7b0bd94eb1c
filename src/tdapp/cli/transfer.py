"""``tdapp transfer …``: run the transfer service (upload returns a URL, the URL downloads)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from tdapp.cli.options import server_timeouts
from tdapp.errors import UsageError

if TYPE_CHECKING:
    from tdapp.serving import ServerTimeouts


@click.group()
def transfer() -> None:
    """The transfer service: upload a file, get a download URL."""


@transfer.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8090, show_default=True, type=click.IntRange(0, 65535))
@click.option("--store", "store_dir", type=click.Path(path_type=Path, file_okay=False),
              default=None, help="Folder for uploads (default: $TDAPP_HOME/transfer).")
@click.option("--s3", "s3_url", metavar="s3://BUCKET/PREFIX", default=None,
              help="Keep uploads in an S3 bucket (endpoint and credentials as boto3 finds "
                   "them, e.g. AWS_ENDPOINT_URL).")
@click.option("--max-size", "--max-upload", "max_size", default=1 << 30, show_default=True,
              type=click.IntRange(1),
              metavar="BYTES", help="Refuse larger uploads (413).")
@click.option("--public-url", default=None, metavar="URL",
              help="Base of the download URLs handed out (default: http://HOST:PORT).")
@server_timeouts(body_help="Close a connection whose upload pauses longer (its partial file "
                           "is deleted).")
def serve(host: str, port: int, store_dir: Path | None, s3_url: str | None, max_size: int,
          public_url: str | None, timeouts: ServerTimeouts) -> None:
    """Run the transfer service over plain HTTP.

    POST /upload with a raw body (?name=FILE or X-File-Name) or a multipart form
    (its first file) answers one line: the download URL, BASE/d/TOKEN/NAME.
    Anyone who knows a URL can download it; uploads appear only when complete.
    """
    if store_dir is not None and s3_url is not None:
        raise UsageError("--store and --s3 exclude each other")
    if public_url is not None and not public_url.startswith(("http://", "https://")):
        raise UsageError(f"--public-url {public_url!r} must start with http:// or https://")
    # Imported here: aiohttp would slow every other command.
    from tdapp.transfer.server import open_store
    from tdapp.transfer.server import serve as run

    run(host=host, port=port, store=open_store(store_dir, s3_url), max_size=max_size,
        public_url=public_url, timeouts=timeouts)

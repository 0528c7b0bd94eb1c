"""``tdapp transfer …``: run the transfer service, and put, get and delete files through it.

Also owns the options that ``tdapp transfer serve`` and ``tdapp up`` share for
their transfer service (:func:`transfer_service_options`), so the two never
drift. Holds no logic beyond turning arguments into calls; must never take a
secret as an argument.
"""

from __future__ import annotations

import functools
import json
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import unquote, urlsplit

import click

from tdapp.cli.options import server_timeouts
from tdapp.errors import UsageError

if TYPE_CHECKING:
    from tdapp.serving import ServerTimeouts

Command = TypeVar("Command", bound=Callable[..., Any])


class Duration(click.ParamType):  # type: ignore[type-arg]
    """``7d``, ``12h``, ``30m``, ``45s``; ``0`` for forever (None)."""

    name = "DURATION"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> float | None:
        if value is None or isinstance(value, float):
            return value
        from tdapp.transfer.lifecycle import parse_duration

        try:
            return parse_duration(str(value))
        except UsageError as error:
            self.fail(error.message, param, ctx)


class Size(click.ParamType):  # type: ignore[type-arg]
    """A number of bytes: ``5000000``, ``500M``, ``20G``."""

    name = "BYTES"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> int | None:
        if value is None or isinstance(value, int):
            return value
        from tdapp.transfer.lifecycle import parse_size

        try:
            return parse_size(str(value))
        except UsageError as error:
            self.fail(error.message, param, ctx)


@dataclass(frozen=True)
class TransferServiceOptions:
    """What ``--s3``, ``--keep``, ``--quota``, ``--upload-token-file`` and
    ``--allow-anonymous-uploads`` asked of a transfer service."""

    s3_url: str | None
    keep: float | None
    quota: int | None
    upload_token_file: Path | None
    allow_anonymous_uploads: bool

    def check_host(self, host: str) -> None:
        """Refuse to let anyone who can reach a non-loopback ``host`` upload, unless asked."""
        from tdapp.core.address import is_loopback

        if self.upload_token_file is None and not self.allow_anonymous_uploads \
                and not is_loopback(host):
            raise UsageError(f"refusing to take uploads from anyone who can reach {host}: give "
                             "--upload-token-file FILE (only its tokens may upload), or "
                             "--allow-anonymous-uploads if that is really intended")


def transfer_service_options(command: Command) -> Command:
    """The transfer service's options, handed to the command as ``service``
    (a :class:`TransferServiceOptions`)."""

    @functools.wraps(command)
    def with_service(*args: Any, s3_url: str | None, keep: float | None, quota: int | None,
                     upload_token_file: Path | None, allow_anonymous_uploads: bool,
                     **kwargs: Any) -> Any:
        service = TransferServiceOptions(s3_url, keep, quota, upload_token_file,
                                         allow_anonymous_uploads)
        return command(*args, service=service, **kwargs)

    options = [
        click.option("--s3", "s3_url", metavar="s3://BUCKET/PREFIX", default=None,
                     help="Keep uploads in an S3 bucket (endpoint and credentials as boto3 "
                          "finds them, e.g. AWS_ENDPOINT_URL)."),
        click.option("--keep", default="7d", show_default=True, type=Duration(),
                     help="Remove uploads this old (e.g. 7d, 12h, 30m; 0 keeps them "
                          "forever): answered 404 at once, swept soon after."),
        click.option("--quota", default=None, type=Size(),
                     help="Most bytes stored in all (e.g. 20G); an upload that would exceed "
                          "it is refused (413). Default: no quota."),
        click.option("--upload-token-file", type=click.Path(
                         path_type=Path, exists=True, dir_okay=False), default=None,
                     metavar="FILE",
                     help="Only uploads with 'Authorization: Bearer TOKEN' of a token in "
                          "FILE (one a line, # comments; re-read when it changes)."),
        click.option("--allow-anonymous-uploads", is_flag=True,
                     help="UNSAFE: let anyone who can reach a non-loopback --host upload "
                          "(and fill the disk) without a token."),
    ]
    decorated: Any = with_service
    for option in reversed(options):
        decorated = option(decorated)
    return decorated  # type: ignore[no-any-return]


@click.group()
def transfer() -> None:
    """The transfer service: upload a file, get a download URL."""


@transfer.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Beyond loopback only with --upload-token-file (or "
                   "--allow-anonymous-uploads).")
@click.option("--port", default=8090, show_default=True, type=click.IntRange(0, 65535))
@click.option("--store", "store_dir", type=click.Path(path_type=Path, file_okay=False),
              default=None, help="Folder for uploads (default: $TDAPP_HOME/transfer).")
@click.option("--max-size", "--max-upload", "max_size", default=1 << 30, show_default=True,
              type=click.IntRange(1),
              metavar="BYTES", help="Refuse larger uploads (413).")
@click.option("--public-url", default=None, metavar="URL",
              help="Base of the download URLs handed out (default: http://HOST:PORT).")
@transfer_service_options
@server_timeouts(body_help="Close a connection whose upload pauses longer (its partial file "
                           "is deleted).")
def serve(host: str, port: int, store_dir: Path | None, max_size: int,
          public_url: str | None, service: TransferServiceOptions,
          timeouts: ServerTimeouts) -> None:
    """Run the transfer service over plain HTTP.

    POST /upload with a raw body (?name=FILE or X-File-Name) or a multipart form
    (its first file) answers one line: the download URL, BASE/d/TOKEN/NAME, and
    a header X-Delete-Token for DELETE of that URL. Anyone who knows a URL can
    download it; uploads appear only when complete.
    """
    if store_dir is not None and service.s3_url is not None:
        raise UsageError("--store and --s3 exclude each other")
    if public_url is not None and not public_url.startswith(("http://", "https://")):
        raise UsageError(f"--public-url {public_url!r} must start with http:// or https://")
    service.check_host(host)
    # Imported here: aiohttp would slow every other command.
    from tdapp.transfer.server import open_store
    from tdapp.transfer.server import serve as run

    run(host=host, port=port, store=open_store(store_dir, service.s3_url), max_size=max_size,
        public_url=public_url, timeouts=timeouts, keep=service.keep, quota=service.quota,
        upload_token_file=service.upload_token_file)


@transfer.command()
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False))
@click.argument("url", required=False)
@click.option("--json", "as_json", is_flag=True,
              help="Print {url, name, size, delete_token_saved} as one JSON object.")
def put(file: Path, url: str | None, as_json: bool) -> None:
    """Upload FILE to URL and print its download URL.

    URL: a transfer service's upload URL (default: the one tdapp up announced,
    else http://127.0.0.1:8090/upload), s3://BUCKET/KEY or file:///FOLDER/.
    The delete token of an http(s) upload is kept in $TDAPP_HOME/uploads.json
    for tdapp transfer delete.
    """
    from tdapp.client.announce import announced
    from tdapp.transfer import upload
    from tdapp.transfer.credentials import recalled

    downloadable = upload(file, url or announced("push"))
    if as_json:
        click.echo(json.dumps({"url": downloadable, "name": file.name,
                               "size": file.stat().st_size,
                               "delete_token_saved": recalled(downloadable) is not None}))
    else:
        click.echo(downloadable)


def _name_in(url: str) -> str:
    name = unquote(urlsplit(url).path).rsplit("/", 1)[-1]
    if name in ("", ".", "..") or "\\" in name or "\0" in name:
        raise UsageError(f"{url!r} ends in no file name: name the target (tdapp transfer get "
                         "URL FILE)")
    return name


@transfer.command()
@click.argument("url")
@click.argument("target", required=False, metavar="[FILE]")
def get(url: str, target: str | None) -> None:
    """Download URL to FILE (default: the URL's last part, in this folder; - for stdout).

    FILE appears only once complete; a failed download leaves it as it was.
    """
    from tdapp.transfer import download

    if target == "-":
        with tempfile.TemporaryDirectory(prefix="tdapp-get-") as folder:
            try:
                path = Path(folder) / _name_in(url)
            except UsageError:
                path = Path(folder) / "download"
            download(url, path)
            with path.open("rb") as handle:
                shutil.copyfileobj(handle, sys.stdout.buffer)
            sys.stdout.buffer.flush()
        return
    path = Path(target) if target else Path.cwd() / _name_in(url)
    download(url, path)
    click.echo(str(path))


@transfer.command()
@click.argument("url")
def delete(url: str) -> None:
    """Delete the upload at URL.

    An http(s) download URL needs the delete token its upload got (kept in
    $TDAPP_HOME/uploads.json by tdapp transfer put, tdapp run --push, …);
    s3:// and file:// objects are deleted directly.
    """
    from tdapp.transfer import delete as remove

    remove(url)
    click.echo(f"deleted {url}", err=True)

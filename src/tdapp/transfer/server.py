"""The transfer service (``tdapp transfer serve``): upload returns a URL, the URL downloads.

``POST /upload`` takes a raw body (name from ``?name=`` or ``X-File-Name``) or
``multipart/form-data`` (its first file part) and answers ``text/plain``: one
line, the download URL ``BASE/d/<token>/<name>``. ``GET /d/<token>/<name>``
answers the bytes. Errors are JSON ``{"kind", "reason"}`` with the status of
their kind (:mod:`tdapp.webjson`: ``input`` 400, ``not_found`` 404, ``timeout``
408, ``too_large`` 413; docs/cas.md, "Errors"). Uploads stream to a spool file
and are published only when complete (and as long as Content-Length said); an
upload that pauses longer than the body timeout
(:class:`tdapp.serving.ServerTimeouts`) is cut off, its connection closed and its
spool file deleted. Must never expose a partial or oversized upload, nor keep one.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from aiohttp import BodyPartReader, StreamReader, http_exceptions, web

from tdapp.core.address import Address
from tdapp.errors import InputError, NotFoundError, TdappError, TimedOutError, TooLargeError
from tdapp.home import private_dir
from tdapp.serving import BodyTimeout, ServerTimeouts, serve_until_signalled, within_body_deadline
from tdapp.transfer.store import (
    CHUNK,
    FolderStore,
    ObjectStore,
    S3Store,
    new_token,
    remove_quietly,
    safe_name,
    valid_key,
)
from tdapp.webjson import error_middleware

DEFAULT_PORT = 8090
DEFAULT_MAX_SIZE = 1 << 30
MULTIPART_SLACK = 64 * 1024  # room for part headers and boundaries around the file
log = logging.getLogger("tdapp.transfer")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# What reading a request body raises when its client went away or sent a broken
# body: the connection reset (aiohttp's C parser), or a payload error of its pure
# Python parser (a short Content-Length body, a bad chunk).
_CUT_OFF = (ConnectionError, web.RequestPayloadError, http_exceptions.HttpProcessingError)


@dataclass
class Settings:
    store: ObjectStore
    max_size: int
    public_url: str | None
    base_url: str | None = None  # set once the port is bound, unless public_url is given


_SETTINGS = web.AppKey("settings", Settings)


def default_store_dir() -> Path:
    return private_dir("transfer")


def text(status: int, line: str) -> web.Response:
    return web.Response(status=status, text=f"{line}\n", content_type="text/plain")


def build_transfer_app(store: ObjectStore | Path, *, max_size: int = DEFAULT_MAX_SIZE,
                       public_url: str | None = None) -> web.Application:
    """The service's application; ``store`` is an ObjectStore or a folder for a FolderStore.

    Without ``public_url`` (and outside :func:`serve`) download URLs use the request's Host.
    """
    if isinstance(store, Path):
        store = FolderStore(store)
    errors = error_middleware(service="transfer service", max_body=MULTIPART_SLACK, logger=log)
    app = web.Application(client_max_size=MULTIPART_SLACK, middlewares=[errors])
    base = public_url.rstrip("/") if public_url else None
    app[_SETTINGS] = Settings(store, max_size, base, base_url=base)
    app.router.add_post("/upload", _upload)
    app.router.add_get("/d/{token}/{name}", _download)
    return app


def _too_large(limit: int) -> TooLargeError:
    return TooLargeError(f"upload larger than the limit of {limit} bytes")


async def _upload(request: web.Request) -> web.Response:
    settings = request.app[_SETTINGS]
    limit = settings.max_size
    multipart = request.content_type == "multipart/form-data"
    length = request.content_length
    if length is not None and length > limit + (MULTIPART_SLACK if multipart else 0):
        raise _too_large(limit)
    token = new_token()
    spooled = settings.store.spool_dir() / f"{token}.part"
    fd = os.open(spooled, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            if multipart:
                requested, size = await _receive_multipart(request, handle, limit)
            else:
                requested = request.query.get("name") or request.headers.get("X-File-Name")
                size = await _copy(request, request.content, handle, limit)
            if length is not None and request.content.total_bytes != length:
                raise InputError(f"upload incomplete: {request.content.total_bytes} of "
                                 f"{length} bytes received")
        name = safe_name(requested)
        await settings.store.publish(spooled, token, name)
    except TdappError as error:
        remove_quietly(spooled)
        log.info("upload refused: %s", error.message)
        raise
    except BodyTimeout as error:
        remove_quietly(spooled)
        log.info("upload from %s stalled (%s); nothing kept", request.remote, error)
        raise TimedOutError(f"upload incomplete: {error}") from None
    except _CUT_OFF as error:
        remove_quietly(spooled)
        log.info("upload cut off (%s); nothing kept", type(error).__name__)
        raise InputError("upload incomplete: the connection broke") from None
    except (Exception, asyncio.CancelledError) as error:
        remove_quietly(spooled)
        if isinstance(error, asyncio.CancelledError):
            log.info("upload cut off (the request was cancelled); nothing kept")
        raise
    base = settings.base_url or f"http://{request.host}"
    log.info("stored %s/%s (%d bytes)", token, name, size)
    return text(200, f"{base}/d/{token}/{name}")


async def _copy(request: web.Request, source: StreamReader | BodyPartReader,
                handle: BinaryIO, limit: int) -> int:
    size = 0
    while True:
        # Each read waits at most the body timeout: a large upload may take long, but
        # may not pause long.
        if isinstance(source, BodyPartReader):
            chunk = await within_body_deadline(request, source.read_chunk(CHUNK))
        else:
            chunk = await within_body_deadline(request, source.read(CHUNK))
        if not chunk:
            return size
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        handle.write(chunk)


async def _receive_multipart(request: web.Request, handle: BinaryIO,
                             limit: int) -> tuple[str | None, int]:
    """Copy the first file part to ``handle``; skip the rest; ``(filename, size)``."""
    try:
        reader = await request.multipart()
    except ValueError:
        raise InputError("the multipart body has no valid boundary") from None
    while True:
        try:
            part = await within_body_deadline(request, reader.next())
        except ValueError:  # aiohttp's parser found no boundary where one must be
            raise InputError("the multipart body is malformed") from None
        if part is None:
            raise InputError("the multipart body has no file part")
        if isinstance(part, BodyPartReader) and part.filename is not None:
            size = await _copy(request, part, handle, limit)
            break
        await within_body_deadline(request, part.release())
    # The rest, read and dropped within bounds.
    while await within_body_deadline(request, request.content.read(CHUNK)):
        if request.content.total_bytes > limit + MULTIPART_SLACK:
            raise _too_large(limit)
    return part.filename, size


async def _download(request: web.Request) -> web.StreamResponse:
    token, name = request.match_info["token"], request.match_info["name"]
    answer = None
    if valid_key(token, name):
        answer = await request.app[_SETTINGS].store.respond(token, name, request)
    if answer is None:
        raise NotFoundError("no such download")
    return answer


def is_wildcard(host: str) -> bool:
    return host.strip("[]") in ("", "0.0.0.0", "::")  # noqa: S104 - compared, not bound


def serve(*, host: str, port: int, store: ObjectStore, max_size: int = DEFAULT_MAX_SIZE,
          public_url: str | None = None, timeouts: ServerTimeouts | None = None) -> None:
    """Run the transfer service until SIGINT or SIGTERM."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    app = build_transfer_app(store, max_size=max_size, public_url=public_url)
    asyncio.run(_run(app, host, port, timeouts))


async def _run(app: web.Application, host: str, port: int,
               timeouts: ServerTimeouts | None) -> None:
    settings = app[_SETTINGS]

    def started(runners: list[web.AppRunner]) -> None:
        bound = [Address(str(a[0]), int(a[1])) for a in runners[0].addresses]
        if settings.public_url:
            settings.base_url = settings.public_url
        elif not is_wildcard(host) and bound:
            settings.base_url = f"http://{Address(host, bound[0].port)}"
        where = settings.base_url or (f"http://{bound[0]}" if bound else host)
        print(f"tdapp transfer service on {where} (upload at {where}/upload)\n"
              f"  store    {settings.store.description}\n"
              f"  max size {settings.max_size} bytes",
              file=sys.stderr, flush=True)

    await serve_until_signalled([(app, host, port, None)], started, timeouts)


def open_store(store_dir: Path | None, s3_url: str | None) -> ObjectStore:
    """The store named on the command line: ``--s3 URL``, ``--store DIR`` or the default."""
    if s3_url:
        s3 = S3Store(s3_url, private_dir("transfer", "spool"))
        s3.check()
        return s3
    return FolderStore(store_dir or default_store_dir())

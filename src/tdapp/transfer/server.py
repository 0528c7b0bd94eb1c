"""The transfer service (``tdapp transfer serve``): upload returns a URL, the URL downloads.

``POST /upload`` takes a raw body (name from ``?name=`` or ``X-File-Name``) or
``multipart/form-data`` (its first file part) and answers ``text/plain``: one
line, the download URL ``BASE/d/<token>/<name>``, and a header
``X-Delete-Token`` that ``DELETE /d/<token>/<name>`` needs (204; a wrong or
missing token 403). ``GET /d/<token>/<name>`` answers the bytes. Errors are JSON
``{"kind", "reason"}`` with the status of their kind (:mod:`tdapp.webjson`:
``input`` 400, ``authentication_required`` 401, ``refused`` 403, ``not_found``
404, ``timeout`` 408, ``too_large`` 413; docs/cas.md, "Errors").

Uploads stream to a spool file and are published only when complete (and as
long as Content-Length said); an upload that pauses longer than the body
timeout (:class:`tdapp.serving.ServerTimeouts`) is cut off, its connection
closed and its spool file deleted. With an upload token file only its tokens'
holders may upload (:mod:`tdapp.transfer.access`); with a quota an upload
reserves its bytes before it may store them (:mod:`tdapp.transfer.lifecycle`);
objects older than ``keep`` are answered 404 and swept (:mod:`tdapp.transfer.sweep`).
Must never expose a partial, oversized, expired or unauthorised upload, nor keep one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from aiohttp import BodyPartReader, StreamReader, http_exceptions, web

from tdapp.core.address import Address
from tdapp.errors import (
    AuthenticationRequired,
    InputError,
    NotFoundError,
    RefusedError,
    TdappError,
    TimedOutError,
    TooLargeError,
    UnavailableError,
)
from tdapp.home import private_dir
from tdapp.serving import (
    TIMEOUTS,
    BodyTimeout,
    ServerTimeouts,
    serve_until_signalled,
    within_body_deadline,
)
from tdapp.transfer.access import UploadTokens, digest_matches, new_delete_token, token_digest
from tdapp.transfer.lifecycle import Quota, Reservation, describe_duration, parse_duration
from tdapp.transfer.s3store import S3Store
from tdapp.transfer.store import (
    CHUNK,
    FolderStore,
    ObjectStore,
    new_token,
    remove_quietly,
    safe_name,
    valid_key,
)
from tdapp.transfer.sweep import SweepState, sweep, sweep_interval
from tdapp.webjson import error_middleware

DEFAULT_PORT = 8090
DEFAULT_MAX_SIZE = 1 << 30
DEFAULT_KEEP = parse_duration("7d")
DELETE_HEADER = "X-Delete-Token"
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
    keep: float | None = DEFAULT_KEEP  # seconds; None: forever
    quota: Quota = field(default_factory=lambda: Quota(None))
    uploaders: UploadTokens | None = None  # None: anyone may upload
    sweep_state: SweepState = field(default_factory=SweepState)

    def oldest(self) -> float | None:
        """Objects published before this are expired (None: none is)."""
        return None if self.keep is None else time.time() - self.keep


_SETTINGS = web.AppKey("settings", Settings)


def default_store_dir() -> Path:
    return private_dir("transfer")


def text(status: int, line: str) -> web.Response:
    return web.Response(status=status, text=f"{line}\n", content_type="text/plain")


def build_transfer_app(store: ObjectStore | Path, *, max_size: int = DEFAULT_MAX_SIZE,
                       public_url: str | None = None, keep: float | None = DEFAULT_KEEP,
                       quota: int | None = None,
                       upload_token_file: Path | None = None) -> web.Application:
    """The service's application; ``store`` is an ObjectStore or a folder for a FolderStore.

    Without ``public_url`` (and outside :func:`serve`) download URLs use the request's Host.
    ``keep`` is in seconds (None: forever); ``quota`` in bytes (None: none); without
    ``upload_token_file`` anyone who reaches the service may upload.
    """
    if isinstance(store, Path):
        store = FolderStore(store)
    errors = error_middleware(service="transfer service", max_body=MULTIPART_SLACK, logger=log)
    app = web.Application(client_max_size=MULTIPART_SLACK, middlewares=[errors])
    base = public_url.rstrip("/") if public_url else None
    uploaders = UploadTokens(upload_token_file) if upload_token_file is not None else None
    app[_SETTINGS] = Settings(store, max_size, base, base_url=base, keep=keep,
                              quota=Quota(quota), uploaders=uploaders)
    app.router.add_post("/upload", _upload)
    app.router.add_get("/d/{token}/{name}", _download)
    app.router.add_delete("/d/{token}/{name}", _delete)
    app.on_response_prepare.append(_challenge)
    app.cleanup_ctx.append(_lifecycle)
    return app


async def _challenge(request: web.Request, response: web.StreamResponse) -> None:
    if response.status == 401:  # RFC 9110: a 401 names the scheme it wants
        response.headers["WWW-Authenticate"] = 'Bearer realm="tdapp transfer"'


def _too_large(limit: int) -> TooLargeError:
    return TooLargeError(f"upload larger than the limit of {limit} bytes")


def _check_uploader(request: web.Request, settings: Settings) -> None:
    """401 unless the request carries one of the upload token file's tokens (if there is one)."""
    if settings.uploaders is None:
        return
    scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not presented.strip():
        reason = "uploads to this service need an Authorization: Bearer upload token"
    elif not settings.uploaders.allows(presented.strip()):
        reason = "the upload token is not accepted (unknown or revoked)"
    else:
        return
    log.info("upload from %s refused: %s", request.remote, reason)
    raise AuthenticationRequired(reason)


async def _upload(request: web.Request) -> web.Response:
    settings = request.app[_SETTINGS]
    _check_uploader(request, settings)  # before anything of the body is read
    limit = settings.max_size
    multipart = request.content_type == "multipart/form-data"
    length = request.content_length
    if length is not None and length > limit + (MULTIPART_SLACK if multipart else 0):
        raise _too_large(limit)
    token = new_token()
    spooled = settings.store.spool_dir() / f"{token}.part"
    reservation = settings.quota.reservation()
    delete_token = new_delete_token()
    try:
        if length is not None and not multipart:
            reservation.need(length)  # the whole of it at once: refused before it is sent
        fd = os.open(spooled, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        settings.sweep_state.spooling.add(spooled)
        with os.fdopen(fd, "wb") as handle:
            if multipart:
                requested, size = await _receive_multipart(request, handle, limit, reservation)
            else:
                requested = request.query.get("name") or request.headers.get("X-File-Name")
                size = await _copy(request, request.content, handle, limit, reservation)
            if length is not None and request.content.total_bytes != length:
                raise InputError(f"upload incomplete: {request.content.total_bytes} of "
                                 f"{length} bytes received")
        name = safe_name(requested)
        await settings.store.publish(spooled, token, name,
                                     delete_digest=token_digest(delete_token))
        reservation.commit(f"{token}/{name}", size)
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
    finally:
        reservation.release()  # nothing left to release once committed
        settings.sweep_state.spooling.discard(spooled)
    base = settings.base_url or f"http://{request.host}"
    log.info("stored %s/%s (%d bytes)", token, name, size)
    answer = text(200, f"{base}/d/{token}/{name}")
    answer.headers[DELETE_HEADER] = delete_token
    answer.headers["Cache-Control"] = "no-store"  # it carries a secret
    return answer


async def _copy(request: web.Request, source: StreamReader | BodyPartReader,
                handle: BinaryIO, limit: int, reservation: Reservation) -> int:
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
        reservation.need(size)  # before the bytes are kept
        handle.write(chunk)


async def _receive_multipart(request: web.Request, handle: BinaryIO, limit: int,
                             reservation: Reservation) -> tuple[str | None, int]:
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
            size = await _copy(request, part, handle, limit, reservation)
            break
        await within_body_deadline(request, part.release())
    # The rest, read and dropped within bounds.
    while await within_body_deadline(request, request.content.read(CHUNK)):
        if request.content.total_bytes > limit + MULTIPART_SLACK:
            raise _too_large(limit)
    return part.filename, size


async def _download(request: web.Request) -> web.StreamResponse:
    token, name = request.match_info["token"], request.match_info["name"]
    settings = request.app[_SETTINGS]
    answer = None
    if valid_key(token, name):
        answer = await settings.store.respond(token, name, request, oldest=settings.oldest())
    if answer is None:
        raise NotFoundError("no such download")
    return answer


async def _delete(request: web.Request) -> web.StreamResponse:
    """Remove an object for whoever holds its delete token; 403 and nothing removed else."""
    token, name = request.match_info["token"], request.match_info["name"]
    settings = request.app[_SETTINGS]
    found = await settings.store.info(token, name) if valid_key(token, name) else None
    oldest = settings.oldest()
    if found is None or (oldest is not None and found.created < oldest):
        raise NotFoundError("no such download")
    if not digest_matches(request.headers.get(DELETE_HEADER), found.delete_digest):
        log.info("delete of %s from %s refused: wrong or missing %s", found.key,
                 request.remote, DELETE_HEADER)
        raise RefusedError(f"deleting a download needs the {DELETE_HEADER} its upload was "
                           "answered with")
    await settings.store.remove(token, name)
    settings.quota.forget(found.key)
    log.info("deleted %s (%d bytes) for its uploader", found.key, found.size)
    return web.Response(status=204)


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    """At start: count what is stored (the quota) and sweep; then sweep every so often."""
    settings = app[_SETTINGS]
    body_timeout = (app.get(TIMEOUTS) or ServerTimeouts()).body
    try:
        for item in await settings.store.inventory():
            settings.quota.record(item.key, item.size)
        await sweep(settings.store, settings.quota, settings.sweep_state, keep=settings.keep,
                    spool_age=body_timeout)
    except (OSError, TdappError) as error:
        raise UnavailableError(f"cannot read the transfer store "
                               f"{settings.store.description}: {error}") from None
    except Exception as error:  # boto3's, for an S3 store
        raise UnavailableError(f"cannot read the transfer store {settings.store.description}: "
                               f"{type(error).__name__}: {error}") from None

    async def every_while() -> None:
        interval = sweep_interval(settings.keep)
        while True:
            await asyncio.sleep(interval)
            try:
                await sweep(settings.store, settings.quota, settings.sweep_state,
                            keep=settings.keep, spool_age=body_timeout)
            except Exception as error:  # a store that fails now may answer at the next sweep
                log.warning("the sweep failed (%s: %s); trying again in %g s",
                            type(error).__name__, error, interval)

    task = asyncio.create_task(every_while())
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def is_wildcard(host: str) -> bool:
    return host.strip("[]") in ("", "0.0.0.0", "::")  # noqa: S104 - compared, not bound


def serve(*, host: str, port: int, store: ObjectStore, max_size: int = DEFAULT_MAX_SIZE,
          public_url: str | None = None, timeouts: ServerTimeouts | None = None,
          keep: float | None = DEFAULT_KEEP, quota: int | None = None,
          upload_token_file: Path | None = None) -> None:
    """Run the transfer service until SIGINT or SIGTERM."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    app = build_transfer_app(store, max_size=max_size, public_url=public_url, keep=keep,
                             quota=quota, upload_token_file=upload_token_file)
    asyncio.run(_run(app, host, port, timeouts))


def describe(settings: Settings) -> str:
    """What the service keeps and who may upload, for its start-up lines."""
    quota = settings.quota
    limit = "none" if quota.limit is None else f"{quota.limit} bytes"
    uploads = (f"with a token of {settings.uploaders.path}" if settings.uploaders
               else "anyone who can connect (no --upload-token-file)")
    return (f"  store    {settings.store.description}\n"
            f"  max size {settings.max_size} bytes\n"
            f"  keep     {describe_duration(settings.keep)}\n"
            f"  quota    {limit} ({quota.stored} bytes stored)\n"
            f"  uploads  {uploads}")


def settings_of(app: web.Application) -> Settings:
    return app[_SETTINGS]


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
              f"{describe(settings)}", file=sys.stderr, flush=True)

    await serve_until_signalled([(app, host, port, None)], started, timeouts)


def open_store(store_dir: Path | None, s3_url: str | None, *,
               root: Path | None = None) -> ObjectStore:
    """The store named on the command line: ``--s3 URL``, ``--store DIR`` or the folder
    ``root`` (default ``$TDAPP_HOME/transfer``), which also holds an S3 store's spool."""
    if s3_url:
        if root is not None:
            root.mkdir(mode=0o700, parents=True, exist_ok=True)
        s3 = S3Store(s3_url, (root or default_store_dir()) / "spool")
        s3.check()
        return s3
    return FolderStore(store_dir or root or default_store_dir())

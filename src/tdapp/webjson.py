"""JSON over aiohttp, shared by tdapp's services (CAS, LAS, transfer service):
bodies in, errors out.

Every error leaves as ``{"kind": "<kind>", "reason": "<one line>"}``: the kind is
the error's :class:`~tdapp.errors.ErrorKind` and the status its ``http_status``
(the table is in docs/cas.md, "Errors"), so a client tells kinds apart by the
``kind`` field, never by the wording of the reason. aiohttp's own refusals get
kinds too (an unknown path ``not_found``, a wrong method ``usage``), a refusal
for too much work in progress carries a Retry-After, and an unexpected
exception is logged and answered ``internal`` (500) without details. A body is
read only up to the limit its endpoint sets and within the body timeout, so a
client cannot make a service buffer more than that or wait for it. Must never
put a traceback or a secret in an answer.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Middleware

from tdapp.errors import (
    ErrorKind,
    InputError,
    OverloadedError,
    TdappError,
    TooLargeError,
    error_class,
)
from tdapp.serving import BodyTimeout, within_body_deadline

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_READ_CHUNK = 64 * 1024


class BodyTooLarge(TooLargeError):
    """A request body over its endpoint's limit (HTTP 413)."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"request body larger than {limit} bytes")


class Overloaded(OverloadedError):
    """Too much work in progress: this client's (HTTP 429) or everyone's (HTTP 503).

    Refused before any of the request's work was done, so the client may retry
    it unchanged after ``retry_after`` seconds.
    """

    def __init__(self, message: str, *, status: int, retry_after: float) -> None:
        super().__init__(message)
        self.http_status = status
        self.retry_after = max(1, math.ceil(retry_after))


def json_error(error: TdappError | ErrorKind, reason: str | None = None, *,
               status: int | None = None) -> web.Response:
    """The answer ``{"kind", "reason"}`` for ``error``, or for an error of that kind.

    The reason is the error's message and the status its ``http_status``, unless
    given; an :class:`Overloaded` answer carries its Retry-After.
    """
    if isinstance(error, TdappError):
        kind, message, code = error.kind, error.message, error.http_status
    else:
        kind, message, code = error, str(error), error_class(error).http_status
    response = web.json_response({"kind": str(kind), "reason": message if reason is None
                                  else reason}, status=code if status is None else status)
    if isinstance(error, Overloaded):
        response.headers["Retry-After"] = str(error.retry_after)
    return response


def _kind_of(status: int) -> ErrorKind:
    """The kind of one of aiohttp's own error answers (routing, parsing)."""
    match status:
        case 404:
            return ErrorKind.NOT_FOUND
        case 405:  # a method this path does not take: the caller's program is wrong
            return ErrorKind.USAGE
        case 408:
            return ErrorKind.TIMEOUT
        case 413:
            return ErrorKind.TOO_LARGE
        case _ if status < 500:
            return ErrorKind.INPUT
        case _:
            return ErrorKind.INTERNAL


def error_middleware(*, service: str, max_body: int,
                     logger: logging.Logger | None = None) -> Middleware:
    """Answers every failure of a handler as ``{"kind", "reason"}`` (logged to ``logger``,
    by default ``tdapp.<service>``, when it is not the caller's doing)."""
    log = logger or logging.getLogger(f"tdapp.{service.lower()}")

    @web.middleware
    async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except TdappError as error:
            return json_error(error)
        except BodyTimeout as error:
            log.info("%s %s from %s: %s", request.method, request.path, request.remote, error)
            return json_error(ErrorKind.TIMEOUT, str(error))
        except ConnectionResetError:
            # The client went away while sending: nobody is left to read an answer.
            log.info("%s %s from %s: the client closed the connection", request.method,
                     request.path, request.remote)
            return json_error(ErrorKind.INPUT,
                              "the connection broke before the request was complete")
        except web.HTTPRequestEntityTooLarge:
            return json_error(ErrorKind.TOO_LARGE, f"request body larger than {max_body} bytes")
        except web.HTTPException as error:
            if error.status >= 400 and error.content_type != "application/json":
                return json_error(_kind_of(error.status), error.reason, status=error.status)
            raise
        except Exception:
            log.exception("unexpected failure on %s %s", request.method, request.path)
            return json_error(ErrorKind.INTERNAL, f"internal error; see the {service} log")

    return errors


async def read_body(request: web.Request, limit: int) -> bytes:
    """The whole request body, at most ``limit`` bytes, arrived within the body timeout.

    A declared Content-Length over the limit is refused before anything is read.
    """
    if request.content_length is not None and request.content_length > limit:
        raise BodyTooLarge(limit)
    if request.content.is_eof():
        # All of it arrived with the headers (a small request): the read cannot stall,
        # so it needs no deadline (whose timer costs more than the read).
        return await _read_at_most(request, limit)
    return await within_body_deadline(request, _read_at_most(request, limit))


async def _read_at_most(request: web.Request, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while chunk := await request.content.read(_READ_CHUNK):
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(limit)
        chunks.append(chunk)
    return b"".join(chunks)


async def json_object(request: web.Request, limit: int) -> dict[str, Any]:
    """The request body (at most ``limit`` bytes) as a JSON object, or an InputError."""
    return parse_json_object(await read_body(request, limit))


def parse_json_object(body: bytes) -> dict[str, Any]:
    """``body`` as a JSON object, or an InputError saying what is wrong."""
    try:
        document = json.loads(body)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise InputError("the request body is not JSON") from None
    if not isinstance(document, dict):
        raise InputError("the request body must be a JSON object")
    return document

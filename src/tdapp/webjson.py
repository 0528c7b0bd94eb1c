"""JSON over aiohttp, shared by tdapp's services (CAS, LAS): bodies in, reasons out.

Every error leaves as ``{"error": "<reason>"}`` with a status that says its
kind; an unexpected exception is logged and answered as a 500 without
details. A body is read only up to the limit its endpoint sets and within the
body timeout, so a client cannot make a service buffer more than that or wait
for it. Must never put a traceback or a secret in an answer.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Middleware

from tdapp.errors import InputError, TdappError, UnavailableError
from tdapp.serving import BodyTimeout, within_body_deadline

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_READ_CHUNK = 64 * 1024


class BodyTooLarge(InputError):
    """A request body over its endpoint's limit (HTTP 413)."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"request body larger than {limit} bytes")


class Overloaded(UnavailableError):
    """Too much work in progress: this client's (HTTP 429) or everyone's (HTTP 503)."""

    def __init__(self, message: str, *, status: int, retry_after: float) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = max(1, math.ceil(retry_after))


def json_error(status: int, reason: str) -> web.Response:
    return web.json_response({"error": reason}, status=status)


def error_middleware(*, service: str, max_body: int,
                     status_of: Callable[[TdappError], int]) -> Middleware:
    log = logging.getLogger(f"tdapp.{service.lower()}")

    @web.middleware
    async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except BodyTooLarge as error:
            return json_error(413, error.message)
        except Overloaded as error:
            response = json_error(error.status, error.message)
            response.headers["Retry-After"] = str(error.retry_after)
            return response
        except TdappError as error:
            return json_error(status_of(error), error.message)
        except BodyTimeout as error:
            log.info("%s %s from %s: %s", request.method, request.path, request.remote, error)
            return json_error(408, str(error))
        except ConnectionResetError:
            # The client went away while sending: nobody is left to read an answer.
            log.info("%s %s from %s: the client closed the connection", request.method,
                     request.path, request.remote)
            return json_error(400, "the connection broke before the request was complete")
        except web.HTTPRequestEntityTooLarge:
            return json_error(413, f"request body larger than {max_body} bytes")
        except web.HTTPException as error:
            if error.status >= 400 and error.content_type != "application/json":
                return json_error(error.status, error.reason)
            raise
        except Exception:
            log.exception("unexpected failure on %s %s", request.method, request.path)
            return json_error(500, f"internal error; see the {service} log")

    return errors


async def read_body(request: web.Request, limit: int) -> bytes:
    """The whole request body, at most ``limit`` bytes, arrived within the body timeout.

    A declared Content-Length over the limit is refused before anything is read.
    """
    if request.content_length is not None and request.content_length > limit:
        raise BodyTooLarge(limit)
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

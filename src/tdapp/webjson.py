"""JSON over aiohttp, shared by tdapp's services (CAS, LAS): bodies in, reasons out.

Every error leaves as ``{"error": "<reason>"}`` with a status that says its
kind; an unexpected exception is logged and answered as a 500 without
details. Must never put a traceback or a secret in an answer.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Middleware

from tdapp.errors import InputError, TdappError

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_error(status: int, reason: str) -> web.Response:
    return web.json_response({"error": reason}, status=status)


def error_middleware(*, service: str, max_body: int,
                     status_of: Callable[[TdappError], int]) -> Middleware:
    log = logging.getLogger(f"tdapp.{service.lower()}")

    @web.middleware
    async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except TdappError as error:
            return json_error(status_of(error), error.message)
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


async def json_object(request: web.Request) -> dict[str, Any]:
    """The request body as a JSON object, or an InputError saying what is wrong."""
    try:
        body = json.loads(await request.read())
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise InputError("the request body is not JSON") from None
    if not isinstance(body, dict):
        raise InputError("the request body must be a JSON object")
    return body

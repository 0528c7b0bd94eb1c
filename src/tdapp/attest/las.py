"""The local attestation service (LAS), simulated: signs ``sim`` evidence on request.

``POST /v1/evidence`` with ``{"report_data": hex128, "measurement": hex64,
"debug": false}`` answers sim evidence (format: :mod:`tdapp.attest.sim`);
``GET /v1/platform`` answers ``{"platform": hex64, "public_key": base64}``.
Plain HTTP, on loopback by default: a simulated LAS signs whatever it is asked,
so anyone who can reach it can make evidence for any measurement. It must never
listen beyond loopback unless told to (``allow_remote``), never answer a
connection whose socket another uid owns (unless told to, by the same flag:
beyond loopback the owner cannot be known), never reveal its
private key, never answer bad input with a 500, and never keep a connection
that stopped sending past its timeouts (:class:`tdapp.serving.ServerTimeouts`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, assert_never

import httpx
from aiohttp import web
from aiohttp.typedefs import Middleware

from tdapp.attest.sim import SimPlatform, b64
from tdapp.core.address import Address, is_loopback
from tdapp.core.origin import origin_of
from tdapp.core.peer import endpoint, tcp_peer_uid
from tdapp.errors import (
    ErrorKind,
    InputError,
    RefusedError,
    TdappError,
    UnavailableError,
    UsageError,
    error_class,
)
from tdapp.home import tdapp_home
from tdapp.serving import ServerTimeouts, serve_until_signalled
from tdapp.webjson import error_middleware, json_error, json_object

DEFAULT_PORT = 18766
DEFAULT_LAS = f"127.0.0.1:{DEFAULT_PORT}"
MAX_BODY = 4096  # an honest request is under 300 bytes
log = logging.getLogger("tdapp.las")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_PLATFORM = web.AppKey("platform", SimPlatform)
_REQUEST_FIELDS = {"report_data": 128, "measurement": 64}
_HEX = frozenset("0123456789abcdef")


def default_state_dir() -> Path:
    return tdapp_home() / "las"


def build_las_app(state_dir: Path, *, serve_uid: int | None = None,
                  unsafe_any_caller: bool = False) -> web.Application:
    """The LAS application, with the platform key of ``state_dir`` (made there on first use).

    It answers only connections whose socket ``serve_uid`` owns (default: the
    uid running it); ``unsafe_any_caller`` answers everyone who can connect.
    """
    errors = error_middleware(service="LAS", max_body=MAX_BODY)
    middlewares = [errors]
    if not unsafe_any_caller:
        middlewares.append(_only_uid(os.geteuid() if serve_uid is None else serve_uid))
    app = web.Application(client_max_size=MAX_BODY, middlewares=middlewares)
    app[_PLATFORM] = SimPlatform.load_or_create(state_dir)
    app.router.add_post("/v1/evidence", _evidence)
    app.router.add_get("/v1/platform", _platform)
    return app


def _only_uid(uid: int) -> Middleware:
    @web.middleware
    async def only_uid(request: web.Request, handler: Handler) -> web.StreamResponse:
        caller = _caller_uid(request)
        if caller != uid:
            log.warning("refused %s %s from %s: its socket belongs to uid %s, not %s",
                        request.method, request.path, request.remote,
                        "unknown" if caller is None else caller, uid)
            return json_error(RefusedError(f"this LAS answers only uid {uid}, the user "
                                           "running it"))
        return await handler(request)
    return only_uid


def _caller_uid(request: web.Request) -> int | None:
    transport = request.transport
    if transport is None:
        return None
    ours, theirs = transport.get_extra_info("sockname"), transport.get_extra_info("peername")
    if not (isinstance(ours, tuple) and isinstance(theirs, tuple)):
        return None
    local, remote = endpoint(str(ours[0]), int(ours[1])), endpoint(str(theirs[0]), int(theirs[1]))
    if local is None or remote is None:
        return None
    return tcp_peer_uid(local, remote)


def platform_of(app: web.Application) -> SimPlatform:
    return app[_PLATFORM]


async def _platform(request: web.Request) -> web.Response:
    platform = request.app[_PLATFORM]
    return web.json_response({"platform": platform.platform,
                              "public_key": b64(platform.raw_public_key)})


async def _evidence(request: web.Request) -> web.Response:
    document = await json_object(request, MAX_BODY)
    unexpected = sorted(set(document) - {*_REQUEST_FIELDS, "debug"})
    if unexpected:
        raise InputError(f"unexpected field {unexpected[0][:40]!r} "
                         "(expected report_data, measurement, debug)")
    values = {name: _hex(document, name, length) for name, length in _REQUEST_FIELDS.items()}
    debug = document.get("debug", False)
    if not isinstance(debug, bool):
        raise InputError("debug must be true or false")
    evidence = request.app[_PLATFORM].evidence(
        measurement=values["measurement"], report_data=bytes.fromhex(values["report_data"]),
        debug=debug, issued_at=time.time())
    return web.json_response(evidence)


def _hex(document: dict[str, Any], name: str, length: int) -> str:
    value = document.get(name)
    if value is None:
        raise InputError(f"{name} is missing")
    if not isinstance(value, str) or len(value) != length or not set(value.lower()) <= _HEX:
        raise InputError(f"{name} must be {length} hex characters")
    return value.lower()


def serve(*, host: str, port: int, state_dir: Path, allow_remote: bool = False,
          timeouts: ServerTimeouts | None = None) -> None:
    """Run the LAS until SIGINT or SIGTERM; refuse a non-loopback host without ``allow_remote``."""
    if not is_loopback(host) and not allow_remote:
        raise UsageError(f"refusing to listen on {host!r}: a simulated LAS signs evidence for "
                         "anyone who can reach it; pass --allow-remote if that is intended")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    app = build_las_app(state_dir, unsafe_any_caller=allow_remote)
    asyncio.run(_run(app, host, port, timeouts))


async def _run(app: web.Application, host: str, port: int,
               timeouts: ServerTimeouts | None) -> None:
    def started(runners: list[web.AppRunner]) -> None:
        platform = app[_PLATFORM]
        bound = ", ".join(f"http://{Address(str(a[0]), int(a[1]))}"
                          for a in runners[0].addresses)
        print(f"tdapp LAS (simulation) on {bound}\n"
              f"  platform {platform.platform}\n"
              f"  key      {platform.key_path}\n"
              "  sim evidence protects nothing against this host's root: development only",
              file=sys.stderr, flush=True)

    await serve_until_signalled([(app, host, port, None)], started, timeouts)


class LasClient:
    """Asks a LAS for evidence over plain HTTP (the LAS runs on this host)."""

    def __init__(self, address: str = DEFAULT_LAS, *, timeout: float = 10.0) -> None:
        self.address = Address.parse(address, default_port=DEFAULT_PORT)
        self.timeout = timeout

    def evidence(self, report_data: bytes, measurement: str,
                 debug: bool = False) -> dict[str, Any]:
        """Sim evidence for ``measurement`` carrying ``report_data`` (64 bytes)."""
        return self._call("POST", "/v1/evidence", {
            "report_data": report_data.hex(), "measurement": measurement, "debug": debug})

    def platform(self) -> dict[str, Any]:
        """``{"platform": hex64, "public_key": base64}`` of the LAS's platform."""
        return self._call("GET", "/v1/platform", None)

    def _call(self, method: str, path: str, body: dict[str, Any] | None) -> dict[str, Any]:
        where = self.address
        try:
            # trust_env off: a proxy from the environment must not sit between us and the LAS.
            with httpx.Client(timeout=self.timeout, trust_env=False) as client:
                response = client.request(method, f"http://{where}{path}", json=body)
        except httpx.HTTPError as error:
            raise UnavailableError(f"cannot reach the LAS at {where}{origin_of(where)}: "
                                   f"{str(error) or type(error).__name__}") from None
        try:
            answer = response.json()
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            raise UnavailableError(f"the LAS at {where} answered HTTP {response.status_code} "
                                   "without a JSON object")
        if response.status_code != 200:
            reason = " ".join(str(answer.get("reason", "no reason given")).split())[:200]
            kind = answer.get("kind")
            raised = _las_error(kind if isinstance(kind, str) else "", response.status_code)
            if issubclass(raised, RefusedError):
                raise raised(f"the LAS at {where} refused the request "
                             f"(HTTP {response.status_code}): {reason}")
            raise raised(f"the LAS at {where} failed (HTTP {response.status_code}): {reason}")
        return answer


def _las_error(kind: str, status: int) -> type[TdappError]:
    """What a LAS client raises for an error answer of ``kind``.

    RefusedError whenever the LAS would not answer what it was asked (bad fields,
    too large, another uid): the runtime asking it is refused, whatever the cause.
    Otherwise the LAS failed: UnavailableError, or its timeout or overload class.
    An answer without a known kind goes by its status.
    """
    try:
        known = ErrorKind(kind)
    except ValueError:
        return RefusedError if 400 <= status < 500 else UnavailableError
    match known:
        case (ErrorKind.USAGE | ErrorKind.INPUT | ErrorKind.TOO_LARGE | ErrorKind.NOT_FOUND
              | ErrorKind.AUTHENTICATION_REQUIRED | ErrorKind.REFUSED | ErrorKind.CONFLICT
              | ErrorKind.WRONG_KEY):
            return RefusedError
        case ErrorKind.TIMEOUT | ErrorKind.OVERLOADED:
            return error_class(known)
        case (ErrorKind.UNAVAILABLE | ErrorKind.INTEGRITY | ErrorKind.PROGRAM_FAILED
              | ErrorKind.INTERNAL):
            return UnavailableError
        case unreachable:
            assert_never(unreachable)

"""Running aiohttp applications in the foreground until SIGINT or SIGTERM.

Shared by every long-running tdapp command (``las serve``, ``transfer serve``,
``cas serve``, ``up``): bind, tell the caller what was bound, wait for a signal,
shut down cleanly. A port that cannot be bound is one clear error, not a
traceback. A listener may bring a socket it already bound (``tdapp up`` takes
all its ports before it touches any state).

It also owns how long a client may hold a connection without making progress
(:class:`ServerTimeouts`): a TLS handshake and a request's headers must arrive
within the header timeout, and a request body may not stall longer than the body
timeout (:func:`within_body_deadline`). A server must never keep a connection,
or anything a request made, for a client that stopped sending.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from aiohttp import web

from tdapp.errors import UnavailableError

Listener = tuple[web.Application, str, int | socket.socket, ssl.SSLContext | None]
T = TypeVar("T")

DEFAULT_HEADER_TIMEOUT = 10.0
DEFAULT_BODY_TIMEOUT = 30.0


@dataclass(frozen=True)
class ServerTimeouts:
    """How long a client may keep a connection without progress, in seconds.

    ``header``: for the TLS handshake, and for a request's line and headers from the
    moment the connection is ready or the previous answer was sent (so also the
    keep-alive of an idle connection). ``body``: the longest a request body may pause.
    """

    header: float = DEFAULT_HEADER_TIMEOUT
    body: float = DEFAULT_BODY_TIMEOUT

    def __post_init__(self) -> None:
        for name, value in (("header", self.header), ("body", self.body)):
            if not value > 0:
                raise ValueError(f"the {name} timeout must be positive, not {value}")


TIMEOUTS = web.AppKey("timeouts", ServerTimeouts)


class BodyTimeout(TimeoutError):
    """A request body stopped arriving for longer than the body timeout."""


def timeouts_of(request: web.Request) -> ServerTimeouts:
    return request.app.get(TIMEOUTS) or ServerTimeouts()


async def within_body_deadline(request: web.Request, reading: Awaitable[T]) -> T:
    """Await ``reading`` (a read of the request body) for at most the body timeout.

    On expiry the body is marked failed, so that aiohttp stops waiting for its rest
    and closes the connection once the answer is sent, and BodyTimeout is raised.
    """
    limit = timeouts_of(request).body
    try:
        async with asyncio.timeout(limit):
            return await reading
    except TimeoutError:
        error = BodyTimeout(f"the request body stalled for more than {limit:g} s")
        request.content.set_exception(error)
        raise error from None


class _Site(web.BaseSite):
    """A TCPSite or SockSite whose TLS handshakes are bounded by the header timeout."""

    __slots__ = ("_handshake_timeout", "_host", "_port")

    def __init__(self, runner: web.BaseRunner, host: str, port: int | socket.socket, *,
                 ssl_context: ssl.SSLContext | None, handshake_timeout: float) -> None:
        super().__init__(runner, ssl_context=ssl_context)
        self._host = host
        self._port = port
        self._handshake_timeout = handshake_timeout

    @property
    def name(self) -> str:
        port = self._port.getsockname()[1] if isinstance(self._port, socket.socket) \
            else self._port
        return f"{'https' if self._ssl_context else 'http'}://{self._host}:{port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        loop = asyncio.get_running_loop()
        handshake = self._handshake_timeout if self._ssl_context is not None else None
        if isinstance(self._port, socket.socket):
            self._server = await loop.create_server(
                server, sock=self._port, ssl=self._ssl_context, backlog=self._backlog,
                ssl_handshake_timeout=handshake)
        else:
            self._server = await loop.create_server(
                server, self._host, self._port, ssl=self._ssl_context, backlog=self._backlog,
                ssl_handshake_timeout=handshake)


async def serve_until_signalled(listeners: Sequence[Listener],
                                started: Callable[[list[web.AppRunner]], None],
                                timeouts: ServerTimeouts | None = None) -> None:
    timeouts = timeouts or ServerTimeouts()
    runners: list[web.AppRunner] = []
    try:
        for app, host, port, context in listeners:
            app[TIMEOUTS] = timeouts
            # aiohttp closes a connection that has no complete request within the
            # keep-alive time, counted from when it is ready or answered last.
            runner = web.AppRunner(app, access_log=None, keepalive_timeout=timeouts.header)
            await runner.setup()
            runners.append(runner)
            site = _Site(runner, host, port, ssl_context=context,
                         handshake_timeout=timeouts.header)
            try:
                await site.start()
            except OSError as error:
                raise UnavailableError(f"cannot listen on {host}:{port}: "
                                       f"{error.strerror or error}") from None
        started(runners)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
    finally:
        for runner in reversed(runners):
            with contextlib.suppress(Exception):
                await runner.cleanup()

"""Running aiohttp applications in the foreground until SIGINT or SIGTERM.

Shared by every long-running tdapp command (``las serve``, ``transfer serve``,
``up``): bind, tell the caller what was bound, wait for a signal, shut down
cleanly. A port that cannot be bound is one clear error, not a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import ssl
from collections.abc import Callable, Sequence

from aiohttp import web

from tdapp.errors import UnavailableError

Listener = tuple[web.Application, str, int, ssl.SSLContext | None]


async def serve_until_signalled(listeners: Sequence[Listener],
                                started: Callable[[list[web.AppRunner]], None]) -> None:
    runners: list[web.AppRunner] = []
    try:
        for app, host, port, context in listeners:
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            runners.append(runner)
            try:
                await web.TCPSite(runner, host, port, ssl_context=context).start()
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

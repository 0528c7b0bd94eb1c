"""The CAS's blocking work, run on a few threads and handed back to the event loop.

``loop.run_in_executor`` builds a ``concurrent.futures.Future`` (a condition and a lock)
per call, chains it to an asyncio future and takes the executor's locks: at several
hundred attestations a second, a measurable share of the interpreter's time. A
:class:`ThreadHop` keeps only a queue: a thread runs the call and settles the caller's
asyncio future through ``call_soon_threadsafe``.

It owns only the hand-over: the call's result or exception reaches the caller unchanged,
a caller that went away (cancelled) is simply not told, and a process forked from one
that used it starts its own threads. It must never run a call twice, nor drop one.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")
THREADS = min(32, (os.cpu_count() or 1) + 4)  # as many as asyncio's default executor

_Call = tuple[Callable[[], Any], asyncio.AbstractEventLoop, "asyncio.Future[Any]"]


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return  # the request ended first (a client that went away); the work is done
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class ThreadHop:
    """A fixed set of daemon threads running blocking calls for coroutines."""

    def __init__(self, threads: int = THREADS) -> None:
        self._size = threads
        self._guard = threading.Lock()
        self._queue: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._owner: int | None = None  # the process whose threads serve the queue

    async def run(self, call: Callable[[], T]) -> T:
        """``call()`` on a thread; its result, or its exception raised here."""
        if self._owner != os.getpid():
            self._start()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queue.put((call, loop, future))
        return await future

    def _start(self) -> None:
        with self._guard:
            if self._owner == os.getpid():
                return
            # A forked child has the parent's queue object but none of its threads.
            self._queue = queue.SimpleQueue()
            for index in range(self._size):
                threading.Thread(target=self._serve, args=(self._queue,), daemon=True,
                                 name=f"tdapp-cas-{index}").start()
            self._owner = os.getpid()

    @staticmethod
    def _serve(calls: queue.SimpleQueue[_Call | None]) -> None:
        while (item := calls.get()) is not None:
            call, loop, future = item
            try:
                result, error = call(), None
            except BaseException as raised:  # handed to the awaiting coroutine
                result, error = None, raised
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody waits
                loop.call_soon_threadsafe(_settle, future, result, error)
            del item, call, result, error  # hold nothing of a finished call while idle

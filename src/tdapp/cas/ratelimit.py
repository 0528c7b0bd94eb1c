"""Per-client limits of the CAS: a request rate, and how much expensive work at once.

:class:`RateLimit` is a token bucket per peer address: a client over its rate
gets 429 with a reason and a Retry-After, before any work is done. Buckets of
idle clients are dropped, so memory stays bounded by the number of recently
active addresses.

:class:`WorkSlots` bounds the requests that make the CAS parse and judge a
document (sessions, attestations, certificate requests): a few per client
address at once, taken before the body is read, the next ones queued behind
them up to a bound (short for anonymous callers) and refused with 429 past it;
and a few in all while documents are parsed and judged, queued up to a bound
and refused with 503 past it. So no client, anonymous or not, can make the CAS
too busy to issue nonces, and a refusal costs no parse.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from enum import Enum

from aiohttp import web
from aiohttp.typedefs import Middleware

from tdapp.webjson import Handler, Overloaded, json_error

_MAX_CLIENTS = 100_000


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimit:
    def __init__(self, per_second: float, burst: float | None = None) -> None:
        self.per_second = per_second
        self.burst = burst if burst is not None else 2 * per_second
        self._buckets: dict[str, _Bucket] = {}

    def allow(self, client: str, now: float | None = None) -> float:
        """0 if the request may go on, else the seconds until it may."""
        now = time.monotonic() if now is None else now
        bucket = self._buckets.get(client)
        if bucket is None:
            if len(self._buckets) >= _MAX_CLIENTS:
                self._forget_idle(now)
            bucket = self._buckets[client] = _Bucket(self.burst, now)
        bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.updated) * self.per_second)
        bucket.updated = now
        if bucket.tokens >= 1:
            bucket.tokens -= 1
            return 0.0
        return (1 - bucket.tokens) / self.per_second

    def _forget_idle(self, now: float) -> None:
        full_after = self.burst / self.per_second
        self._buckets = {client: bucket for client, bucket in self._buckets.items()
                         if now - bucket.updated < full_after}

    def middleware(self) -> Middleware:
        @web.middleware
        async def limit(request: web.Request, handler: Handler) -> web.StreamResponse:
            wait = self.allow(request.remote or "unknown")
            if wait:
                # Answered here, outside the error middleware: nothing of the request runs.
                return json_error(Overloaded(f"too many requests from {request.remote}; the "
                                             f"limit is {self.per_second:g} per second",
                                             status=429, retry_after=wait))
            return await handler(request)

        return limit


DEFAULT_WORK_PER_CLIENT = 2
DEFAULT_WORK_TOTAL = 4
_RETRY_AFTER = 1.0


class Caller(Enum):
    """Who asks for work, which decides how long a queue it may form."""

    ANONYMOUS = "anonymous"  # no client certificate: nothing to attribute its requests to
    IDENTIFIED = "identified"  # a certified identity: its requests are audited


@dataclass(frozen=True)
class WorkLimits:
    per_client: int = DEFAULT_WORK_PER_CLIENT  # in progress at once per client address
    total: int = DEFAULT_WORK_TOTAL  # being parsed and judged at once, all clients
    anonymous_waiting: int = 2  # queued per address behind its own, without an identity
    identified_waiting: int = 64  # queued per address behind its own, with one
    total_waiting: int = 64  # bodies read and queued for a work slot, all clients

    def __post_init__(self) -> None:
        if min(self.per_client, self.total) < 1 or min(
                self.anonymous_waiting, self.identified_waiting, self.total_waiting) < 0:
            raise ValueError("work limits: at least one slot, and no negative queue")


class _Queue:
    """``capacity`` holders at once, the others waiting in turn (on the event loop only)."""

    def __init__(self, capacity: int) -> None:
        self.semaphore = asyncio.Semaphore(capacity)
        self.waiting = 0
        self.users = 0  # holders and waiters: the queue can be dropped at 0

    @contextlib.asynccontextmanager
    async def slot(self, max_waiting: int, refusal: Callable[[], Overloaded]
                   ) -> AsyncIterator[None]:
        if self.semaphore.locked():
            if self.waiting >= max_waiting:
                raise refusal()
            self.waiting += 1
            try:
                await self.semaphore.acquire()
            finally:
                self.waiting -= 1
        else:
            await self.semaphore.acquire()  # free: returns at once
        try:
            yield
        finally:
            self.semaphore.release()


class WorkSlots:
    """Bounded queues for expensive requests: one per client address, one for all.

    A client's request waits behind that client's own requests in progress, in a
    short queue without an identity and a longer one with; past its queue it gets
    429. Once its body is read it waits for one of all clients' slots; past that
    queue it gets 503. Both refusals carry a Retry-After, and cost no parse.
    """

    def __init__(self, limits: WorkLimits | None = None) -> None:
        self.limits = limits or WorkLimits()
        self._clients: dict[str, _Queue] = {}
        self._work = _Queue(self.limits.total)

    @contextlib.asynccontextmanager
    async def for_client(self, client: str, caller: Caller) -> AsyncIterator[None]:
        """One of ``client``'s slots for the whole request (queued), or Overloaded (429)."""
        limits = self.limits
        queue = self._clients.get(client)
        if queue is None:
            queue = self._clients[client] = _Queue(limits.per_client)
        waiting = (limits.anonymous_waiting if caller is Caller.ANONYMOUS
                   else limits.identified_waiting)

        def refusal() -> Overloaded:
            return Overloaded(f"too many requests in progress from {client} (at most "
                              f"{limits.per_client} at once and {waiting} waiting); retry "
                              "when one is answered", status=429, retry_after=_RETRY_AFTER)

        queue.users += 1
        try:
            async with queue.slot(waiting, refusal):
                yield
        finally:
            queue.users -= 1
            if queue.users == 0:
                del self._clients[client]

    @contextlib.asynccontextmanager
    async def for_work(self) -> AsyncIterator[None]:
        """One of all clients' slots while a document is parsed and judged (queued), or
        Overloaded (503)."""
        limits = self.limits

        def refusal() -> Overloaded:
            return Overloaded(f"the CAS is busy ({limits.total} documents are being checked "
                              f"and {limits.total_waiting} wait); retry shortly",
                              status=503, retry_after=_RETRY_AFTER)

        async with self._work.slot(limits.total_waiting, refusal):
            yield

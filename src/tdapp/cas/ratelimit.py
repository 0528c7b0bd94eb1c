"""Per-client limits of the CAS: a request rate, and how much expensive work at once.

:class:`RateLimit` is a token bucket per peer address: a client over its rate
gets 429 with a reason and a Retry-After, before any work is done. Buckets of
idle clients are dropped, so memory stays bounded by the number of recently
active addresses.

:class:`WorkSlots` bounds the requests that make the CAS parse and judge a
document (sessions, attestations, certificate requests): a few per client
address at once (429 past that, taken before the body is read) and a few in all
(503 past that, taken once the body is in), so that no client, anonymous or
not, can make the CAS too busy to issue nonces.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

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
                response = json_error(429, f"too many requests from {request.remote}; "
                                           f"the limit is {self.per_second:g} per second")
                response.headers["Retry-After"] = str(max(1, math.ceil(wait)))
                return response
            return await handler(request)

        return limit


DEFAULT_WORK_PER_CLIENT = 2
DEFAULT_WORK_TOTAL = 4
_RETRY_AFTER = 1.0


class WorkSlots:
    """Counts of expensive requests in progress, per client address and in all.

    Slots are taken and given back on the event loop only, so plain counters do.
    """

    def __init__(self, per_client: int = DEFAULT_WORK_PER_CLIENT,
                 total: int = DEFAULT_WORK_TOTAL) -> None:
        if per_client < 1 or total < 1:
            raise ValueError("work slots must be at least 1")
        self.per_client = per_client
        self.total = total
        self._by_client: dict[str, int] = {}
        self._in_use = 0

    @contextlib.contextmanager
    def for_client(self, client: str) -> Iterator[None]:
        """One of ``client``'s slots for the whole request, or Overloaded (429)."""
        held = self._by_client.get(client, 0)
        if held >= self.per_client:
            raise Overloaded(f"too many requests in progress from {client} (at most "
                             f"{self.per_client} at once); retry when one is answered",
                             status=429, retry_after=_RETRY_AFTER)
        self._by_client[client] = held + 1
        try:
            yield
        finally:
            left = self._by_client[client] - 1
            if left:
                self._by_client[client] = left
            else:
                del self._by_client[client]

    @contextlib.contextmanager
    def for_work(self) -> Iterator[None]:
        """One of all clients' slots while a document is parsed and judged, or Overloaded (503)."""
        if self._in_use >= self.total:
            raise Overloaded(f"the CAS is busy ({self.total} documents are being checked); "
                             "retry shortly", status=503, retry_after=_RETRY_AFTER)
        self._in_use += 1
        try:
            yield
        finally:
            self._in_use -= 1

"""Per-client request rate limit of the CAS (token bucket per peer address).

A client over its rate gets 429 with a reason and a Retry-After, before any
work is done. Buckets of idle clients are dropped, so memory stays bounded by
the number of recently active addresses.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from aiohttp import web
from aiohttp.typedefs import Middleware

from tdapp.webjson import Handler, json_error

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

"""Prometheus metrics of the CAS: requests, latency, and refusals by reason.

Label values are bounded: routes are the registered patterns, and refusal
reasons have hashes, tags and quoted names folded out, so a client cannot
grow the metrics without bound. Must never put a secret or a session name in
a label.
"""

from __future__ import annotations

import re
import time

from aiohttp import web
from aiohttp.typedefs import Middleware
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from tdapp.webjson import Handler

_HEX = re.compile(r"\b[0-9a-f]{16,}\b")
_QUOTED = re.compile(r"'[^']*'")


def reason_class(reason: str) -> str:
    """A refusal reason with its particulars folded out, for a bounded label."""
    return _QUOTED.sub("'…'", _HEX.sub("…", reason))[:100]


class CasMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("tdapp_cas_requests_total", "HTTP requests answered",
                                ["method", "route", "status"], registry=self.registry)
        self.latency = Histogram("tdapp_cas_request_seconds", "Time to answer a request",
                                 ["route"], registry=self.registry,
                                 buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5))
        self.refusals = Counter("tdapp_cas_refusals_total", "Decisions refused, by reason",
                                ["event", "reason"], registry=self.registry)

    def refused(self, event: str, reason: str) -> None:
        self.refusals.labels(event, reason_class(reason)).inc()

    def middleware(self) -> Middleware:
        @web.middleware
        async def measure(request: web.Request, handler: Handler) -> web.StreamResponse:
            started = time.perf_counter()
            response = await handler(request)
            resource = request.match_info.route.resource
            route = resource.canonical if resource is not None else "unmatched"
            self.requests.labels(request.method, route, str(response.status)).inc()
            self.latency.labels(route).observe(time.perf_counter() - started)
            return response

        return measure

    async def handle(self, request: web.Request) -> web.Response:
        response = web.Response(body=generate_latest(self.registry))
        response.content_type = CONTENT_TYPE_LATEST.split(";")[0]
        return response

"""Prometheus metrics of a pool worker: tasks by outcome and how long their runs took.

A worker's tasks run in its pool's child processes, so the metrics use
prometheus_client's multiprocess mode: :func:`prepare` points
``PROMETHEUS_MULTIPROC_DIR`` at a private folder *before* prometheus_client is
imported anywhere in the worker (the children inherit it), the children count
(:func:`count`), and the worker's main process serves the sum on
``--metrics-port`` (:func:`serve`). Nothing here carries a task's arguments or
results: only counts and durations.
"""

from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prometheus_client import Counter, Histogram

_ENV = "PROMETHEUS_MULTIPROC_DIR"


def prepare() -> Path:
    """A fresh private folder for the children's metric files (call before any import of
    prometheus_client in this process)."""
    folder = Path(tempfile.mkdtemp(prefix="tdapp-worker-metrics-"))
    os.environ[_ENV] = str(folder)
    return folder


def serve(port: int, host: str = "127.0.0.1") -> None:
    """Serve the sum of every child's metrics on ``host:port`` (``/metrics``)."""
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    start_http_server(port, addr=host, registry=registry)


def count(outcome: str, seconds: float) -> None:
    """One task ended with ``outcome`` (success, duplicate, failure) after ``seconds``."""
    if _ENV not in os.environ:
        return  # metrics were not asked for
    tasks, durations = _metrics()
    tasks.labels(outcome=outcome).inc()
    durations.labels(outcome=outcome).observe(seconds)


@functools.cache
def _metrics() -> tuple[Counter, Histogram]:
    from prometheus_client import Counter, Histogram

    return (Counter("tdapp_pool_tasks", "Pool tasks this worker ended, by outcome",
                    ["outcome"]),
            Histogram("tdapp_pool_task_seconds", "How long a pool task's run took, by outcome",
                      ["outcome"], buckets=(0.5, 1, 2, 5, 10, 30, 60, 300, 900, 3600,
                                            float("inf"))))

"""The transfer service's sweep: what expired, and what a killed server left, goes.

Run at start and then every :func:`sweep_interval`: objects published longer
ago than ``keep`` are removed (and their bytes freed in the quota), and so are
spool files and unfinished object folders untouched for longer than the body
timeout (an upload in progress writes at least that often, and the server's
own uploads in progress are skipped whatever their age). Every removal is
logged. Must never remove an object younger than ``keep``, nor the spool file
of an upload in progress.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from tdapp.transfer.lifecycle import Quota, describe_duration
from tdapp.transfer.store import ObjectStore

log = logging.getLogger("tdapp.transfer")
LONGEST_INTERVAL = 300.0
SHORTEST_INTERVAL = 0.5


@dataclass
class SweepState:
    """The spool files of this server's uploads in progress (never swept)."""

    spooling: set[Path] = field(default_factory=set)


def sweep_interval(keep: float | None) -> float:
    """Seconds between sweeps: a quarter of ``keep``, within half a second and five minutes."""
    if keep is None:
        return LONGEST_INTERVAL
    return min(LONGEST_INTERVAL, max(SHORTEST_INTERVAL, keep / 4))


async def sweep(store: ObjectStore, quota: Quota, state: SweepState, *, keep: float | None,
                spool_age: float) -> int:
    """One sweep; the number of things removed."""
    now = time.time()
    removed = 0
    if keep is not None:
        for item in await store.inventory():
            if item.created < now - keep and await store.remove(item.token, item.name):
                quota.forget(item.key)
                removed += 1
                log.info("sweep: removed %s (%d bytes), older than %s", item.key, item.size,
                         describe_duration(keep))
    for path in sorted(store.spool_dir().glob("*.part")):
        if path in state.spooling:
            continue
        with contextlib.suppress(FileNotFoundError):
            info = path.stat()
            if info.st_mtime < now - spool_age:
                path.unlink()
                removed += 1
                log.info("sweep: removed the spool file %s (%d bytes) of an upload that "
                         "ended with no answer", path.name, info.st_size)
    for what in await store.tidy(now - spool_age):
        removed += 1
        log.info("sweep: removed %s", what)
    return removed

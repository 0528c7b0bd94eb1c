"""How long the transfer service keeps uploads, and how many bytes: expiry and quota.

:func:`parse_duration` reads ``--keep`` (``7d``, ``12h``, ``30m``, ``45s``, ``0``
for forever); :class:`Quota` accounts for the bytes stored and the bytes that
uploads in progress have reserved, so that concurrent uploads never together
overshoot ``--quota``. It lives in the service's event loop: a check and its
reservation happen without an await between them. Must never let an upload
keep bytes it did not reserve.
"""

from __future__ import annotations

import re

from tdapp.errors import TooLargeError, UsageError

_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd]?)")
_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_SIZE = re.compile(r"(\d+)([KMGT]?)(?:i?B)?", re.IGNORECASE)
_BYTES = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
DEFAULT_KEEP = "7d"


def parse_duration(text: str) -> float | None:
    """Seconds for ``7d``, ``12h``, ``30m``, ``45s`` or ``45``; None (forever) for ``0``."""
    match = _DURATION.fullmatch(text.strip().lower())
    if match is None:
        raise UsageError(f"{text!r} is not a duration (like 7d, 12h, 30m, 45s, or 0 for "
                         "forever)")
    seconds = float(match[1]) * _SECONDS[match[2]]
    return seconds or None


def parse_size(text: str) -> int:
    """Bytes for ``5000``, ``500M``, ``20G`` (powers of 1024; ``GiB``/``GB`` alike)."""
    match = _SIZE.fullmatch(text.strip())
    if match is None or int(match[1]) == 0:
        raise UsageError(f"{text!r} is not a size in bytes (like 5000000, 500M or 20G)")
    return int(match[1]) * _BYTES[match[2].lower()]


def describe_duration(seconds: float | None) -> str:
    if seconds is None:
        return "forever"
    for unit in ("d", "h", "m"):
        if seconds >= _SECONDS[unit] and seconds % _SECONDS[unit] == 0:
            return f"{int(seconds // _SECONDS[unit])}{unit}"
    return f"{seconds:g}s"


class Quota:
    """Bytes stored (per object key) and bytes reserved by uploads in progress."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self._objects: dict[str, int] = {}
        self.stored = 0
        self.reserved = 0

    def record(self, key: str, size: int) -> None:
        self.forget(key)
        self._objects[key] = size
        self.stored += size

    def forget(self, key: str) -> int | None:
        """The object ``key`` is gone: its bytes are free again (once, however often told)."""
        size = self._objects.pop(key, None)
        if size is not None:
            self.stored -= size
        return size

    def reservation(self) -> Reservation:
        return Reservation(self)

    def refusal(self, wanted: int) -> TooLargeError:
        free = max(0, (self.limit or 0) - self.stored - self.reserved)
        return TooLargeError(f"upload refused: the store's quota of {self.limit} bytes would be "
                             f"exceeded ({wanted} bytes asked, {free} free)")


class Reservation:
    """The bytes one upload holds against the quota, grown as they arrive."""

    def __init__(self, quota: Quota) -> None:
        self.quota = quota
        self.held = 0

    def need(self, size: int) -> None:
        """Hold at least ``size`` bytes, or raise TooLargeError holding no more than before."""
        extra = size - self.held
        if extra <= 0:
            return
        quota = self.quota
        if quota.limit is not None and quota.stored + quota.reserved + extra > quota.limit:
            raise quota.refusal(size)
        quota.reserved += extra
        self.held = size

    def commit(self, key: str, size: int) -> None:
        """The upload was published as ``key``: its bytes are stored, no longer reserved."""
        self.release()
        self.quota.record(key, size)

    def release(self) -> None:
        self.quota.reserved -= self.held
        self.held = 0

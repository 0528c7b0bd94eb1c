"""Sizes: binary units for files and buffers, MB (10^6 bytes) for throughput."""

from __future__ import annotations

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
MB = 1_000_000


def human_size(size: int) -> str:
    """``size`` in the largest binary unit that divides it exactly, e.g. "64 KiB"."""
    for unit, scale in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if size >= scale and size % scale == 0:
            return f"{size // scale} {unit}"
    return f"{size} B"

"""File systems: the mount table, FileSystem, free space, choosing tmpfs and disk, settling.

Syncing is ``tdapp.volume.layout.sync_file_system`` (syncfs on the file system holding a
path), the same call tdapp makes, so there is one copy of it in the project.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from tdapp.volume.layout import sync_file_system

from .processes import log
from .units import GiB, KiB

MEMORY_FILE_SYSTEMS = frozenset({"tmpfs", "ramfs"})
TMPFS_BASE = Path("/dev/shm")


@dataclass(frozen=True)
class FileSystem:
    key: str  # "tmpfs" or "disk"
    base: Path
    mount_point: str
    fstype: str
    device: str

    @property
    def in_memory(self) -> bool:
        return self.fstype in MEMORY_FILE_SYSTEMS

    @property
    def label(self) -> str:
        return f"{self.key} ({self.fstype})"

    def as_json(self) -> dict[str, str]:
        return {"path": str(self.base), "fstype": self.fstype, "device": self.device,
                "mount_point": self.mount_point}


def _unescape_mount_field(text: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda match: chr(int(match.group(1), 8)), text)


def _mount_table() -> list[tuple[str, str, str]]:
    """(mount point, fs type, device) of every mount, in mount order."""
    mounts = []
    with open("/proc/self/mountinfo", encoding="utf-8") as table:
        for line in table:
            fields = line.split()
            separator = fields.index("-")
            mounts.append((_unescape_mount_field(fields[4]), fields[separator + 1],
                           fields[separator + 2]))
    return mounts


def _is_under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def describe_file_system(key: str, base: Path) -> FileSystem:
    real = os.path.realpath(base)
    mount_point, fstype, device = "/", "?", "?"
    for point, kind, source in _mount_table():
        if _is_under(real, point) and len(point) >= len(mount_point):
            mount_point, fstype, device = point, kind, source
    return FileSystem(key, Path(real), mount_point, fstype, device)


def mounts_under(path: Path) -> list[str]:
    real = os.path.realpath(path)
    return [point for point, _, _ in _mount_table() if _is_under(point, real) and point != real]


def memory_available_bytes() -> int:
    with open("/proc/meminfo", encoding="utf-8") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * KiB
    return 0


def space_problem(fs: FileSystem, need: int) -> str | None:
    """Why ``fs`` cannot hold the benchmark's files, or None."""
    free = shutil.disk_usage(fs.base).free
    if free < need:
        return f"only {free / GiB:.1f} GiB free at {fs.base}, need {need / GiB:.1f} GiB"
    if fs.in_memory and memory_available_bytes() < need:
        available = memory_available_bytes() / GiB
        return f"only {available:.1f} GiB of memory available for tmpfs, need {need / GiB:.1f}"
    return None


def pick_disk_base(requested: Path | None, default: Path) -> tuple[FileSystem | None, str]:
    """The first writable, disk-backed candidate folder, or None and why not."""
    candidates = [requested] if requested else [default]
    if not requested:
        candidates += [Path(p) for p in (os.environ.get("TMPDIR"), "/var/tmp") if p]
    reasons = []
    for candidate in candidates:
        fs = describe_file_system("disk", candidate)
        if not os.access(candidate, os.W_OK):
            reasons.append(f"{candidate} is not writable")
        elif fs.in_memory:
            reasons.append(f"{candidate} is on {fs.fstype}, not a disk")
        else:
            return fs, ""
    return None, "; ".join(reasons)


def choose_file_systems(only: str | None, disk_dir: Path | None, default_disk: Path,
                        need_bytes: int) -> tuple[dict[str, FileSystem], dict[str, str]]:
    """tmpfs and the disk (or the ``only`` one) that have room: (chosen, skipped -> why)."""
    chosen: dict[str, FileSystem] = {}
    skipped: dict[str, str] = {}
    if only in (None, "tmpfs"):
        tmpfs = describe_file_system("tmpfs", TMPFS_BASE)
        if not tmpfs.in_memory:
            skipped["tmpfs"] = f"{TMPFS_BASE} is {tmpfs.fstype}, not tmpfs"
        else:
            _admit(tmpfs, need_bytes, chosen, skipped)
    if only in (None, "disk"):
        disk, reason = pick_disk_base(disk_dir, default_disk)
        if disk is None:
            skipped["disk"] = reason
        else:
            _admit(disk, need_bytes, chosen, skipped)
    return chosen, skipped


def _admit(fs: FileSystem, need_bytes: int, chosen: dict[str, FileSystem],
           skipped: dict[str, str]) -> None:
    problem = space_problem(fs, need_bytes)
    if problem:
        skipped[fs.key] = problem
        log(f"{fs.key}: skipped — {problem}")
    else:
        chosen[fs.key] = fs


def drop_from_page_cache(root: Path) -> None:
    """Evict the (clean) data pages of every file under ``root``; call after a sync."""
    for current, _, names in os.walk(root):
        for name in names:
            fd = os.open(os.path.join(current, name), os.O_RDONLY | os.O_NOFOLLOW)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def settle(fs: FileSystem, work: Path, step_input: Path) -> None:
    """Flush everything, and on a disk make ``step_input`` come from the disk again."""
    sync_file_system(work)
    if not fs.in_memory:
        drop_from_page_cache(step_input)

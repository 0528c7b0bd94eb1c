"""A run's work folders: ciphertext in an ordinary temporary folder, plaintext only in memory.

:func:`ciphertext_folder` holds what is sealed (the downloaded bundle, the
sealed and resealed volumes, the output bundle, the shield's mount points):
a private folder under the temporary folder (``TMPDIR``), on disk.

:func:`plaintext_folder` holds the decrypted volumes, and is memory:

- As root, a tmpfs of the run's own (``mode=0700,nosuid,nodev``) sized for the
  volumes' plaintext plus the program's write allowance, so a DApp cannot fill
  the host's memory: it gets ENOSPC. It is mounted on a fresh folder under
  ``/dev/shm`` (under the temporary folder when there is no ``/dev/shm``: a
  mount point holds nothing itself) and unmounted at the end.
- Otherwise (or when root may not mount), a fresh folder under ``/dev/shm``,
  once ``/proc/self/mountinfo`` shows that it really is a tmpfs with room for
  the plaintext. There the allowance is not enforced; ``/dev/shm``'s own size
  bounds what the program writes.
- If neither is possible the run is refused (:class:`UnavailableError`).

The write allowance is the image's heap limit: the program may write into its
volumes as much as it may hold in memory. Each file, folder or page of
allowance counts one inode, so a flood of empty files is bounded too.

:func:`remove_abandoned` takes down the folders (and mounts) of runs that were
killed. This module must never put plaintext on a disk (no fallback to
``TMPDIR``), follow a symlink planted at a plaintext folder's path (folders
are made by ``mkdtemp`` and mounted through an ``O_PATH`` descriptor), or
remove a folder another user owns.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator
from enum import Enum
from pathlib import Path

from tdapp.errors import UnavailableError
from tdapp.runtime.mounts import unmount_abandoned

SHM = Path("/dev/shm")  # noqa: S108 - memory, so plaintext never reaches a disk
MOUNTINFO = Path("/proc/self/mountinfo")
WORK_PREFIX = "tdapp-run-"
PAGE = os.sysconf("SC_PAGE_SIZE")
SLACK_BYTES = 1024 * 1024
"""Added to a private tmpfs's size: the extraction's staging folder and rounding."""

_MS_NOSUID, _MS_NODEV = 0x2, 0x4
_MNT_DETACH, _UMOUNT_NOFOLLOW = 0x2, 0x8

Log = Callable[[str], None]


class PlaintextStore(Enum):
    """Where a run's plaintext lives; both are memory."""

    PRIVATE_TMPFS = "a private tmpfs"
    SHARED_SHM = "the shared memory folder"


def write_allowance(heap: int) -> int:
    """How much the program may write into its volumes: its heap limit (module docstring)."""
    return heap


def pages(size: int) -> int:
    """Bytes a file of ``size`` bytes takes on a tmpfs."""
    return -(-size // PAGE) * PAGE


@contextlib.contextmanager
def ciphertext_folder() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix=f"{WORK_PREFIX}{os.getpid()}-") as work:
        yield Path(work)


@contextlib.contextmanager
def plaintext_folder(plaintext_bytes: int, entries: int, allowance: int, log: Log, *,
                     shm: Path = SHM, mountinfo: Path = MOUNTINFO,
                     privileged: bool | None = None) -> Iterator[Path]:
    """A private folder in memory for ``plaintext_bytes`` (page-rounded) in ``entries``
    files and folders, plus ``allowance``; removed, and unmounted, at the end."""
    if privileged is None:
        privileged = os.geteuid() == 0
    store = PlaintextStore.SHARED_SHM
    if privileged:
        parent = shm if shm.is_dir() else None
        folder = Path(tempfile.mkdtemp(prefix=f"{WORK_PREFIX}{os.getpid()}-", dir=parent))
        try:
            _mount_tmpfs(folder, plaintext_bytes + allowance + SLACK_BYTES,
                         entries + allowance // PAGE + 16)
            store = PlaintextStore.PRIVATE_TMPFS
        except UnavailableError as error:
            with contextlib.suppress(OSError):
                folder.rmdir()
            log(f"{error}; the plaintext goes to {shm}, where the write allowance is not "
                "enforced")
    if store is PlaintextStore.SHARED_SHM:
        _require_tmpfs(shm, mountinfo, plaintext_bytes)
        folder = Path(tempfile.mkdtemp(prefix=f"{WORK_PREFIX}{os.getpid()}-", dir=shm))
    try:
        yield folder
    finally:
        if store is PlaintextStore.PRIVATE_TMPFS:
            _unmount(folder)
        shutil.rmtree(folder, ignore_errors=True)


def _require_tmpfs(shm: Path, mountinfo: Path, needed: int) -> None:
    if not shm.is_dir():
        raise UnavailableError(f"{shm} does not exist, and decrypted volumes live only in "
                               "memory; mount a tmpfs there or run tdapp run as root (it "
                               "then mounts a private one)")
    kind = filesystem_type(shm, mountinfo)
    if kind != "tmpfs":
        raise UnavailableError(f"{shm} is {kind or 'an unknown file system'}, not a tmpfs, "
                               "and decrypted volumes live only in memory; mount a tmpfs "
                               "there or run tdapp run as root (it then mounts a private one)")
    info = os.statvfs(shm)
    free = info.f_bavail * info.f_frsize
    if free < needed:
        raise UnavailableError(f"the decrypted volumes need {needed} bytes of memory and "
                               f"{shm} has {free} free")


def filesystem_type(path: Path, mountinfo: Path = MOUNTINFO) -> str | None:
    """The type of the file system ``path`` is on, from the innermost mount holding it."""
    target = os.path.realpath(path)
    best, kind = -1, None
    try:
        lines = mountinfo.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if "-" not in fields[6:] or len(fields) < 5:
            continue
        point = re.sub(r"\\([0-7]{3})", lambda match: chr(int(match[1], 8)), fields[4])
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= best:  # later lines are mounted over earlier ones
            best, kind = len(point), fields[fields.index("-", 6) + 1]
    return kind


@functools.cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                           ctypes.c_char_p]
    libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
    return libc


def _mount_tmpfs(folder: Path, size: int, inodes: int) -> None:
    # The folder was just made by mkdtemp; mounting on its descriptor (not its path) means
    # nothing swapped in at the path since is ever followed.
    try:
        descriptor = os.open(folder, os.O_PATH | os.O_NOFOLLOW | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as error:
        raise UnavailableError(f"cannot mount a private tmpfs at {folder}: "
                               f"{error.strerror} (not the folder this run made)") from None
    try:
        if os.fstat(descriptor).st_uid != os.geteuid():
            raise UnavailableError(f"{folder} is not this user's own folder")
        options = f"size={pages(size)},nr_inodes={inodes},mode=0700".encode()
        if _libc().mount(b"tmpfs", f"/proc/self/fd/{descriptor}".encode(), b"tmpfs",
                         _MS_NOSUID | _MS_NODEV, options) != 0:
            reason = os.strerror(ctypes.get_errno())
            raise UnavailableError(f"cannot mount a private tmpfs at {folder}: {reason}")
    finally:
        os.close(descriptor)


def _unmount(folder: Path) -> None:
    path = os.fsencode(folder)
    if _libc().umount2(path, _UMOUNT_NOFOLLOW) != 0:
        # Still busy (a straggler holds a file): detach now; the kernel frees it on release.
        _libc().umount2(path, _UMOUNT_NOFOLLOW | _MNT_DETACH)


def remove_abandoned(roots: Iterable[Path] = ()) -> None:
    """Delete work folders of runs that were killed (their process is gone).

    A run killed with SIGKILL cannot clean up after itself; its plaintext would
    otherwise stay in memory until reboot. Only this user's own folders are touched.
    """
    for root in roots or (SHM, Path(tempfile.gettempdir())):
        for folder in root.glob(f"{WORK_PREFIX}*"):
            pid_text = folder.name.split("-")[2]
            if not pid_text.isdigit() or int(pid_text) == os.getpid():
                continue
            try:
                info = folder.lstat()
                os.kill(int(pid_text), 0)
            except ProcessLookupError:
                if stat.S_ISDIR(info.st_mode) and info.st_uid == os.geteuid():
                    unmount_abandoned(folder)
                    if os.path.ismount(folder):
                        _libc().umount2(os.fsencode(folder), _UMOUNT_NOFOLLOW | _MNT_DETACH)
                    shutil.rmtree(folder, ignore_errors=True)
            except (PermissionError, FileNotFoundError):
                continue  # another user's live run, or removed meanwhile

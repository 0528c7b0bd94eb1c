"""The stored folder of a volume: its entries, its lock and its atomic commits.

A volume folder holds exactly ``volume.fspf``, ``objects/`` (sealed contents
under random names) and ``plain/`` (files of not-protected regions, as they
are). New content is always written under fresh names and made durable before
the FSPF that references it replaces the old one by rename; so a crash at any
point leaves the previous volume intact. This module knows nothing of keys.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

from tdapp.errors import ConflictError, InputError, IntegrityError
from tdapp.volume.fspf import MAX_FSPF_SIZE

FSPF_NAME = "volume.fspf"
OBJECTS_DIR = "objects"
PLAIN_DIR = "plain"
KNOWN_ENTRIES = frozenset({FSPF_NAME, OBJECTS_DIR, PLAIN_DIR})
_TEMP_SUFFIX = ".tdapp-tmp"


class VolumeFolder:
    """Paths and file-system operations on one volume folder."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.fspf = root / FSPF_NAME
        self.objects = root / OBJECTS_DIR
        self.plain = root / PLAIN_DIR
        self._objects_prefix = f"{self.objects}/"

    def object_path(self, name: str) -> str:
        # A plain string: this is on the per-file hot path, where pathlib costs more than I/O.
        return f"{self._objects_prefix}{name}"

    def ensure_new(self) -> None:
        """Prepare an empty folder for a new volume, refusing to overwrite anything."""
        if self.root.exists() and not self.root.is_dir():
            raise InputError(f"{self.root} exists and is not a folder")
        if self.root.is_dir() and any(self.root.iterdir()):
            raise InputError(f"{self.root} is not empty; a new volume needs an empty folder")
        self.root.mkdir(parents=True, exist_ok=True)
        self.objects.mkdir()
        self.plain.mkdir()

    def remove_new(self, *, remove_root: bool) -> None:
        """Undo :meth:`ensure_new` after a failed creation."""
        if remove_root:
            shutil.rmtree(self.root, ignore_errors=True)
            return
        for child in (self.objects, self.plain):
            shutil.rmtree(child, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            self.fspf.unlink()

    def read_fspf(self) -> bytes:
        if not self.root.is_dir():
            raise InputError(f"volume folder {self.root} does not exist")
        try:
            fd = open_regular_file(self.fspf)
        except FileNotFoundError:
            raise InputError(f"{self.root} is not a tdapp volume (no {FSPF_NAME})") from None
        with os.fdopen(fd, "rb") as handle:
            data = handle.read(MAX_FSPF_SIZE + 1)
        if len(data) > MAX_FSPF_SIZE:
            raise InputError(f"{self.fspf} is larger than {MAX_FSPF_SIZE} bytes")
        return data

    @contextlib.contextmanager
    def locked(self, *, exclusive: bool) -> Iterator[None]:
        """Hold an advisory lock on the folder itself (no lock file is left behind)."""
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            operation = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
            try:
                fcntl.flock(fd, operation | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ConflictError(
                    f"{self.root} is being written by another process; try again"
                ) from None
            yield
        finally:
            os.close(fd)

    def stored_objects(self) -> set[str]:
        try:
            return {entry.name for entry in os.scandir(self.objects)}
        except FileNotFoundError:
            return set()

    def unexpected_entries(self) -> list[str]:
        return sorted(entry.name for entry in os.scandir(self.root)
                      if entry.name not in KNOWN_ENTRIES)

    def commit_fspf(self, data: bytes) -> None:
        """Make all written objects durable, then atomically replace the FSPF."""
        sync_file_system(self.root)
        write_atomically(self.fspf, data)

    def remove_objects(self, names: set[str]) -> None:
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.object_path(name))
        for entry in os.scandir(self.root):
            if entry.name.endswith(_TEMP_SUFFIX):
                with contextlib.suppress(FileNotFoundError):
                    Path(entry.path).unlink()


def open_regular_file(path: str | Path) -> int:
    """Open a stored file for reading, refusing links, FIFOs and devices without blocking.

    Raises FileNotFoundError when it is missing, IntegrityError when it is not a
    regular file (someone put something else in its place).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as error:
        if error.errno == errno.ELOOP:
            name = os.path.basename(path)
            raise IntegrityError(f"{name} in the volume is a symbolic link") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        name = os.path.basename(path)
        raise IntegrityError(f"{name} in the volume is not a regular file")
    os.set_blocking(fd, True)
    return fd


def write_atomically(target: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to a temporary sibling, fsync it, rename it over ``target``."""
    temporary = target.with_name(f".{target.name}.{os.urandom(6).hex()}{_TEMP_SUFFIX}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        with os.fdopen(fd, "wb", closefd=True) as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
        raise
    fsync_directory(target.parent)


def fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def sync_file_system(path: Path) -> None:
    """Flush every dirty page of the file system holding ``path`` (one call, many files).

    One ``syncfs`` is far cheaper than an ``fsync`` per object when a volume
    gains thousands of small files, and gives the same guarantee before the
    FSPF rename.
    """
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _libc.syncfs(fd) != 0:
            code = ctypes.get_errno()
            if code != errno.ENOSYS:
                raise OSError(code, os.strerror(code), str(path))
            os.sync()
    finally:
        os.close(fd)

"""The stored folder of a volume: its entries, its lock and its atomic commits.

A volume folder holds exactly ``volume.fspf``, ``objects/`` (sealed contents
under random names) and ``plain/`` (files of not-protected regions, as they
are). New content is always written under fresh names and made durable before
the FSPF that references it replaces the old one by rename; so a crash at any
point leaves the previous volume intact. ``objects/`` and ``plain/`` are opened
without following links, and everything in them relative to those open folders:
a link put in the stored folder never makes tdapp read, write or delete files
elsewhere. Setuid, setgid and sticky bits are never written to ``plain/`` nor
reported from it. This module knows nothing of keys.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import os
import re
import shutil
import stat
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tdapp.core.atomic import TEMP_SUFFIX, write_atomically
from tdapp.errors import ConflictError, InputError, IntegrityError
from tdapp.volume.fspf import MAX_FSPF_SIZE, PERMISSION_BITS
from tdapp.volume.paths import check_stored_path, escape_path

FSPF_NAME = "volume.fspf"
OBJECTS_DIR = "objects"
PLAIN_DIR = "plain"
KNOWN_ENTRIES = frozenset({FSPF_NAME, OBJECTS_DIR, PLAIN_DIR})
_TEMP_SUFFIXES = (".tdapp-tmp", TEMP_SUFFIX)  # the first: files of older versions


@dataclass(frozen=True)
class PlainEntry:
    """A file or folder found under ``plain/`` (modes without setuid, setgid, sticky)."""

    relative: str
    is_dir: bool
    size: int
    mode: int
    mtime_ns: int


class VolumeFolder:
    """Paths and file-system operations on one volume folder.

    ``objects/`` and ``plain/`` are opened as folders without following a link,
    and everything under them relative to those folders, one component at a
    time: someone who can write the stored folder cannot make a reader, writer
    or cleaner act on files elsewhere.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.fspf = root / FSPF_NAME
        self.objects = root / OBJECTS_DIR
        self.plain = root / PLAIN_DIR
        self._objects_fd: int | None = None

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

    # -- objects/ -------------------------------------------------------------------

    def _objects(self, *, create: bool = False) -> int | None:
        """The open ``objects/`` folder (kept for this object's life), None if missing."""
        if self._objects_fd is None:
            if create:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(self.objects)
            fd = _open_own_folder(self.root, OBJECTS_DIR)
            if fd is None:
                return None
            self._objects_fd = fd
            weakref.finalize(self, os.close, fd)
        return self._objects_fd

    def ensure_objects(self) -> None:
        """Make ``objects/`` if it is missing (a bundle carries no empty folder)."""
        self._objects(create=True)

    def open_object(self, name: str) -> int:
        """Open a stored object for reading; FileNotFoundError if it is missing."""
        objects = self._objects()
        if objects is None:
            raise FileNotFoundError(errno.ENOENT, "no objects folder", name)
        return open_regular_file(name, dir_fd=objects)

    def create_object(self, name: str, *, readable: bool = False) -> int:
        """Create a new object exclusively (never through a link already in its place)."""
        objects = self._objects(create=True)
        assert objects is not None
        access = os.O_RDWR if readable else os.O_WRONLY
        return os.open(name, access | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                       0o644, dir_fd=objects)

    def stored_objects(self) -> set[str]:
        """Every name in ``objects/`` (whatever it is)."""
        objects = self._objects()
        return set(os.listdir(objects)) if objects is not None else set()

    def remove_objects(self, names: set[str]) -> None:
        """Delete these objects (names that are not object names are left alone)."""
        objects = self._objects()
        for name in names:
            if objects is not None and _OBJECT_NAME.fullmatch(name):
                with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                    os.unlink(name, dir_fd=objects)
        for entry in os.scandir(self.root):
            if entry.name.endswith(_TEMP_SUFFIXES):
                with contextlib.suppress(FileNotFoundError):
                    Path(entry.path).unlink()

    # -- the folder -----------------------------------------------------------------

    def unexpected_entries(self) -> list[str]:
        return sorted(entry.name for entry in os.scandir(self.root)
                      if entry.name not in KNOWN_ENTRIES)

    def commit_fspf(self, data: bytes) -> None:
        """Make all written objects durable, then atomically replace the FSPF."""
        sync_file_system(self.root)
        write_atomically(self.fspf, data)

    # -- plain/ ---------------------------------------------------------------------

    def plain_entries(self) -> list[PlainEntry]:
        """Every file and folder under ``plain/``, sorted; refuses links, devices, bad names."""
        plain = _open_own_folder(self.root, PLAIN_DIR)
        if plain is None:
            return []
        entries: list[PlainEntry] = []
        pending = [""]
        try:
            while pending:  # a loop, not recursion: a stored tree may be hostile and deep
                folder = pending.pop()
                fd = _open_beneath(plain, folder)
                try:
                    for name in os.listdir(fd):
                        relative = f"{folder}/{name}" if folder else name
                        entry = _plain_entry(fd, name, relative)
                        entries.append(entry)
                        if entry.is_dir:
                            pending.append(relative)
                finally:
                    os.close(fd)
        finally:
            os.close(plain)
        entries.sort(key=lambda entry: entry.relative)
        return entries

    def open_plain_file(self, relative: str) -> int:
        """Open ``plain/<relative>`` for reading, following no link on the way."""
        plain = _open_own_folder(self.root, PLAIN_DIR)
        if plain is None:
            raise IntegrityError(f"{PLAIN_DIR}/ disappeared from the volume while it was read")
        try:
            parent, _, name = relative.rpartition("/")
            folder = _open_beneath(plain, parent)
        finally:
            os.close(plain)
        try:
            return open_regular_file(name, dir_fd=folder, shown=f"{PLAIN_DIR}/{relative}")
        except FileNotFoundError:
            raise IntegrityError(f"{PLAIN_DIR}/{escape_path(relative)} disappeared from the "
                                 "volume while it was read") from None
        finally:
            os.close(folder)

    def make_plain_folder(self, relative: str) -> None:
        self._plain_folder(relative).close()

    def write_plain_file(self, relative: str, source: int, mode: int) -> None:
        """Copy fd ``source`` to ``plain/<relative>`` (replacing it), with its times."""
        parent, _, name = relative.rpartition("/")
        with self._plain_folder(parent) as folder:
            temporary = f".{name[:200]}.{os.urandom(6).hex()}.tmp"
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600, dir_fd=folder.fd)
            try:
                try:
                    copy_content(source, fd)
                    info = os.fstat(source)
                    os.fchmod(fd, mode & PERMISSION_BITS)
                    os.utime(fd, ns=(info.st_atime_ns, info.st_mtime_ns))
                finally:
                    os.close(fd)
                os.replace(temporary, name, src_dir_fd=folder.fd, dst_dir_fd=folder.fd)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(temporary, dir_fd=folder.fd)
                raise

    def _plain_folder(self, relative: str) -> _OpenFolder:
        """``plain/<relative>``, made where missing, opened without following links."""
        with contextlib.suppress(FileExistsError):
            os.mkdir(self.plain)
        plain = _open_own_folder(self.root, PLAIN_DIR)
        assert plain is not None
        try:
            return _OpenFolder(_open_beneath(plain, relative, create=True))
        finally:
            os.close(plain)


class _OpenFolder:
    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __enter__(self) -> _OpenFolder:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        os.close(self.fd)


_OBJECT_NAME = re.compile("[0-9a-f]{32}")
_FOLDER_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _open_own_folder(root: Path, name: str) -> int | None:
    """Open ``objects/`` or ``plain/`` of a volume as a real folder; None if missing."""
    try:
        return os.open(root / name, _FOLDER_FLAGS)
    except FileNotFoundError:
        return None
    except OSError as error:
        if error.errno in (errno.ELOOP, errno.ENOTDIR):
            raise IntegrityError(f"{name} in the volume folder is not a folder "
                                 "(a symbolic link or a file was put in its place)") from None
        raise


def _open_beneath(base: int, relative: str, *, create: bool = False) -> int:
    """Open the folder ``relative`` under fd ``base`` one component at a time, no links."""
    fd = os.dup(base)
    try:
        for name in relative.split("/") if relative else ():
            if create:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(name, dir_fd=fd)
            child = os.open(name, _FOLDER_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = child
    except OSError as error:
        os.close(fd)
        if error.errno in (errno.ELOOP, errno.ENOTDIR, errno.ENOENT):
            raise IntegrityError(f"{PLAIN_DIR}/{escape_path(relative)} in the volume is not "
                                 "a folder (a symbolic link or a file was put in its place, "
                                 "or it was removed)") from None
        raise
    return fd


def _plain_entry(folder: int, name: str, relative: str) -> PlainEntry:
    shown = f"{PLAIN_DIR}/{escape_path(relative)}"
    try:
        check_stored_path(relative)
    except InputError as error:
        raise IntegrityError(f"{shown} in the volume has a name a volume may not hold "
                             f"({error.message})") from None
    info = os.stat(name, dir_fd=folder, follow_symlinks=False)
    kind = stat.S_IFMT(info.st_mode)
    if kind == stat.S_IFLNK:
        raise IntegrityError(f"{shown} in the volume is a symbolic link")
    if kind not in (stat.S_IFREG, stat.S_IFDIR):
        raise IntegrityError(f"{shown} in the volume is not a regular file or folder")
    return PlainEntry(relative, kind == stat.S_IFDIR, info.st_size,
                      stat.S_IMODE(info.st_mode) & PERMISSION_BITS, info.st_mtime_ns)


def copy_content(source: int, target: int) -> None:
    """Copy fd ``source`` from where it is to its end into fd ``target``."""
    while data := os.read(source, 1024 * 1024):
        view = memoryview(data)
        while view:
            view = view[os.write(target, view):]


def open_regular_file(path: str | Path, *, dir_fd: int | None = None,
                      shown: str | None = None) -> int:
    """Open a stored file for reading, refusing links, FIFOs and devices without blocking.

    Raises FileNotFoundError when it is missing, IntegrityError when it is not a
    regular file (someone put something else in its place).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     dir_fd=dir_fd)
    except OSError as error:
        if error.errno == errno.ELOOP:
            name = escape_path(shown or os.path.basename(path))
            raise IntegrityError(f"{name} in the volume is a symbolic link") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        name = escape_path(shown or os.path.basename(path))
        raise IntegrityError(f"{name} in the volume is not a regular file")
    os.set_blocking(fd, True)
    return fd


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


_SYNC_FILE_RANGE_WRITE = 2
_sync_file_range = getattr(_libc, "sync_file_range", None)
if _sync_file_range is not None:
    _sync_file_range.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    _sync_file_range.restype = ctypes.c_int


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing this range of ``fd`` to the disk, without waiting.

    Only a hint that spreads the disk writes over the time a file is being written
    instead of leaving them all to the ``syncfs`` before the commit; durability still
    comes from that ``syncfs``. Where the call is missing or refused, nothing happens.
    """
    if _sync_file_range is not None:
        _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)

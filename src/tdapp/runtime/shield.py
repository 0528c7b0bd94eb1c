"""The file system shield: a volume mounted with FUSE, decrypted and verified as it is read.

:func:`serve_volume` mounts a :class:`~tdapp.volume.live.LiveVolume` at a folder
(libfuse 3 through mfusepy, one thread) until it is unmounted, then commits and
returns the new tag and every read that was refused. A chunk that fails
authentication is EIO to the program and a named failure for the runtime,
never wrong bytes. Hard and symbolic links, devices and extended attributes
are not part of a volume and fail with their proper errno. This module owns
only the mapping from FUSE calls to the live volume; it must never decide on
its own what is trusted, and never let a failed chunk pass.

Speed: requests of up to 1 MiB (``max_read``, ``max_write``, and the mount's read-ahead
raised from the kernel's 128 KiB where root may, :func:`widen_readahead`); a read fills
libfuse's reply buffer in place and a write seals from libfuse's request buffer
(:func:`_fuse_class`), whole chunks straight from it; one thread, because the decryption
holds the GIL and a second FUSE thread only contends for it (measured slower). The
objects alive at mount time are frozen out of the garbage collector, whose walks over
them otherwise cost about 0.2 s at every unmount.

The runtime's side, one ``tdapp volume mount`` child per volume, is
:mod:`tdapp.runtime.mounts`.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import gc
import os
import re
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from ctypes.util import find_library
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from tdapp.errors import TdappError, UnavailableError
from tdapp.runtime.page_cache import ChunkPusher
from tdapp.volume import Volume
from tdapp.volume.keys import VolumeTag
from tdapp.volume.live import LiveVolume

MAX_IO = 1024 * 1024  # bytes per FUSE read or write request: fewer, larger calls
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_TRUNC | os.O_CREAT
F = TypeVar("F", bound=Callable[..., Any])


@functools.cache
def _fuse() -> Any:
    """mfusepy over libfuse 3, loaded once: every refused lookup raises through it, and
    ``find_library`` runs ldconfig."""
    # mfusepy takes libfuse 2 when both are installed; tdapp needs libfuse 3 (and CI has only it).
    if find_library("fuse3"):
        os.environ.setdefault("FUSE_LIBRARY_NAME", "fuse3")
    try:
        import mfusepy
    except (ImportError, OSError) as error:  # OSError: libfuse3 itself is missing
        raise UnavailableError(f"the FUSE shield needs libfuse3 and mfusepy ({error}); install "
                               "the 'fuse3' package or use the tmpfs shield") from None
    return mfusepy


@functools.cache
def _fuse_class() -> Any:
    """mfusepy's FUSE with a read that fills libfuse's reply buffer in place and a write that
    reads the request's buffer in place: mfusepy's own copy each range once more."""
    fuse = _fuse()

    class ShieldFUSE(fuse.FUSE):  # type: ignore[misc, name-defined]
        def read(self, path: bytes | None, buf: Any, size: int, offset: int, fip: Any) -> int:
            out = (ctypes.c_char * size).from_address(ctypes.addressof(buf.contents))
            name = "" if path is None else path.decode(self.encoding, self.errors)
            count: int = self.operations.read_into(name, memoryview(out).cast("B"), offset)
            return count

        def write(self, path: bytes | None, buf: Any, size: int, offset: int, fip: Any) -> int:
            # The request's bytes in libfuse's buffer, not a copy: the live volume copies or
            # seals them before it returns and keeps no reference.
            data = (ctypes.c_char * size).from_address(ctypes.addressof(buf.contents))
            name = "" if path is None else path.decode(self.encoding, self.errors)
            written: int = self.operations.write(name, memoryview(data).cast("B"), offset, 0)
            return written

    return ShieldFUSE


_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")  # mountinfo writes " " as \\040, and so on


def mount_device(mountpoint: Path) -> str | None:
    """``major:minor`` of the FUSE mount at ``mountpoint`` (the last one there), from
    /proc/self/mountinfo: a stat of the mount would wait for the shield itself."""
    found = None
    with contextlib.suppress(OSError), open("/proc/self/mountinfo", encoding="utf-8",
                                            errors="replace") as table:
        for line in table:
            fields, _, rest = line.partition(" - ")
            parts = fields.split()
            if len(parts) < 5:
                continue
            point = _OCTAL_ESCAPE.sub(lambda m: chr(int(m[1], 8)), parts[4])
            if point == str(mountpoint) and rest.startswith("fuse"):
                found = parts[2]
    return found


def widen_readahead(mountpoint: Path, size: int) -> bool:
    """Let the kernel read ahead ``size`` bytes on this mount, so that a large read reaches
    the shield as requests of ``size`` (``max_read``): by default a FUSE mount reads ahead
    128 KiB, and every 128 KiB is then one round trip. The setting belongs to this mount
    alone (its own backing device info); only root may change it, otherwise it stays."""
    device = mount_device(mountpoint)
    if device is None:
        return False
    try:
        Path(f"/sys/class/bdi/{device}/read_ahead_kb").write_text(f"{size // 1024}\n")
    except OSError:
        return False
    return True


@dataclass
class ShieldReport:
    tag: VolumeTag
    failures: list[str] = field(default_factory=list)


def _translated(method: F) -> F:
    """OSError -> its errno; a chunk that failed authentication -> EIO, recorded."""
    @functools.wraps(method)
    def call(self: ShieldOperations, *args: Any) -> Any:
        try:
            return method(self, *args)
        except OSError as error:
            raise _fuse().FuseOSError(error.errno or errno.EIO) from None
        except TdappError as error:
            if error.message not in self.failures:  # the kernel may retry the same read
                self.failures.append(error.message)
                print(f"tdapp shield: {error.message}", file=sys.stderr, flush=True)
            raise _fuse().FuseOSError(errno.EIO) from None
    return call  # type: ignore[return-value]


class ShieldOperations:
    """FUSE operations over one live volume (mfusepy's Operations protocol)."""

    use_ns = True

    def __init__(self, live: LiveVolume, *, read_only: bool,
                 mountpoint: Path | None = None) -> None:
        self.live, self.read_only, self.mountpoint = live, read_only, mountpoint
        self.failures: list[str] = []
        self.mounted = False
        self._handles: dict[str, int] = {}
        self._uid, self._gid = os.getuid(), os.getgid()
        # read-only mounts: the rest of a chunk a small read authenticated, into the page cache
        self._pusher: ChunkPusher | None = None

    def init_with_config(self, conn_info: Any, config: Any) -> None:
        self.mounted = True
        library = getattr(_fuse(), "_libfuse", None)
        if self.read_only and self.mountpoint is not None and library is not None:
            self._pusher = ChunkPusher(library, self.mountpoint)
            self._pusher.start()
        if self.mountpoint is not None:
            widen_readahead(self.mountpoint, MAX_IO)
        if conn_info is not None:
            conn_info.max_write = MAX_IO
            conn_info.max_read = MAX_IO  # must equal the max_read mount option
            conn_info.max_readahead = MAX_IO
        if config is not None:
            config.kernel_cache = 1  # nothing else changes the files under us

    def _writable(self, path: str) -> None:
        if self.read_only:
            raise OSError(errno.EROFS, "the volume is mounted read-only", path)

    @_translated
    def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
        is_dir, size, mode, mtime_ns = self.live.stat(path)
        kind = stat.S_IFDIR if is_dir else stat.S_IFREG
        return {"st_mode": kind | mode, "st_nlink": 2 if is_dir else 1, "st_size": size,
                "st_uid": self._uid, "st_gid": self._gid, "st_blocks": -(-size // 512),
                "st_mtime": mtime_ns, "st_ctime": mtime_ns, "st_atime": mtime_ns}

    @_translated
    def readdir(self, path: str, fh: int) -> list[str]:
        return [".", "..", *self.live.listdir(path)]

    @_translated
    def open(self, path: str, flags: int) -> int:
        if not self.live.is_file(path):
            raise OSError(errno.EISDIR if self.live.is_dir(path) else errno.ENOENT, path)
        if flags & _WRITE_FLAGS:
            self._writable(path)
        if flags & os.O_TRUNC:
            self.live.truncate(path, 0)
        return self._hold(path)

    @_translated
    def create(self, path: str, mode: int, fi: Any = None) -> int:
        self._writable(path)
        self.live.create(path, mode)
        return self._hold(path)

    def _hold(self, path: str) -> int:
        self._handles[path] = self._handles.get(path, 0) + 1
        return 0

    @_translated
    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        return self.live.read(path, offset, size)

    @_translated
    def read_into(self, path: str, out: memoryview, offset: int) -> int:
        count = self.live.read_into(path, offset, out)
        if self._pusher is not None:
            for start, plaintext in self.live.partly_read_chunks(path, offset, count):
                self._pusher.push(path.lstrip("/"), start, plaintext, offset, offset + count)
        return count

    def destroy(self, path: str) -> None:
        if self._pusher is not None:
            self._pusher.close()

    @_translated
    def write(self, path: str, data: bytes | memoryview, offset: int, fh: int) -> int:
        self._writable(path)
        return self.live.write(path, offset, data)

    @_translated
    def truncate(self, path: str, length: int, fh: int | None = None) -> None:
        self._writable(path)
        self.live.truncate(path, length)

    @_translated
    def release(self, path: str, fh: int) -> None:
        left = self._handles.get(path, 1) - 1
        if left > 0:
            self._handles[path] = left
            return
        self._handles.pop(path, None)
        if not self.read_only:
            self.live.release(path)

    def flush(self, path: str, fh: int) -> int:
        return 0

    def fsync(self, path: str, datasync: int, fh: int) -> int:
        return 0

    @_translated
    def unlink(self, path: str) -> None:
        self._writable(path)
        self.live.unlink(path)

    @_translated
    def mkdir(self, path: str, mode: int) -> None:
        self._writable(path)
        self.live.mkdir(path, mode)

    @_translated
    def rmdir(self, path: str) -> None:
        self._writable(path)
        self.live.rmdir(path)

    @_translated
    def rename(self, old: str, new: str) -> None:
        self._writable(new)
        self.live.rename(old, new)
        if old in self._handles:
            self._handles[new] = self._handles.pop(old)

    @_translated
    def chmod(self, path: str, mode: int) -> None:
        self._writable(path)
        self.live.set_mode(path, mode)

    @_translated
    def chown(self, path: str, uid: int, gid: int) -> None:
        raise OSError(errno.EPERM, "a volume records no owners", path)

    @_translated
    def utimens(self, path: str, times: tuple[int, int] | None = None) -> None:
        self._writable(path)
        self.live.set_mtime(path, times[1] if times is not None else time.time_ns())

    @_translated
    def link(self, target: str, source: str) -> None:
        raise OSError(errno.EPERM, "a volume holds no hard links", target)

    @_translated
    def symlink(self, target: str, source: str) -> None:
        raise OSError(errno.EPERM, "a volume holds no symbolic links", target)

    @_translated
    def mknod(self, path: str, mode: int, dev: int) -> None:
        raise OSError(errno.EPERM, "a volume holds only files and folders", path)

    def statfs(self, path: str) -> dict[str, int]:
        info = os.statvfs(self.live.folder_root)
        return {key: getattr(info, key) for key in (
            "f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree",
            "f_favail", "f_namemax")}


_ENDING_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
_PR_SET_PDEATHSIG = 1


@contextlib.contextmanager
def _unmount_on_signal(mountpoint: Path) -> Iterator[None]:
    """SIGTERM, SIGINT or SIGHUP unmount cleanly, so that what was written is sealed.

    The FUSE loop holds the main thread in C, where a Python handler would not
    run; so the signals are blocked and one thread waits for them.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _ENDING_SIGNALS)

    def wait() -> None:
        signal.sigwait(_ENDING_SIGNALS)
        subprocess.run(["fusermount3", "-u", str(mountpoint)], check=False,
                       capture_output=True, timeout=60)

    threading.Thread(target=wait, daemon=True, name="tdapp-shield-signals").start()
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def end_with_parent() -> None:
    """Get SIGTERM (and so unmount) when the parent dies: a runtime killed with SIGKILL
    must not leave its volumes mounted."""
    parent = os.getppid()
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    if os.getppid() != parent:  # it died before the request took effect
        raise UnavailableError("the process that asked for the mount has ended")


def serve_volume(volume: Volume, mountpoint: Path, *, read_only: bool = False,
                 allow_other: bool = False, ready: threading.Event | None = None) -> ShieldReport:
    """Mount ``volume`` at ``mountpoint`` until it is unmounted; commit; report."""
    fuse_class = _fuse_class()
    with volume.live() as live:
        operations = ShieldOperations(live, read_only=read_only, mountpoint=mountpoint)
        options: dict[str, Any] = {"foreground": True, "nothreads": True, "fsname": "tdapp",
                                   "subtype": "tdapp", "default_permissions": True,
                                   "max_read": MAX_IO}
        if allow_other:
            options["allow_other"] = True
        if read_only:
            options["ro"] = True
        if ready is not None:
            ready.set()
        # What is alive now lives until the unmount: the collector need not walk it again
        # and again while files are read and written, nor at exit.
        gc.freeze()
        try:
            with _unmount_on_signal(mountpoint):
                fuse_class(operations, str(mountpoint), **options)
        except RuntimeError as error:
            # libfuse also reports an ending by SIGTERM or SIGINT as an error; once mounted,
            # that is an unmount like any other, and what was written is sealed below.
            if not operations.mounted:
                raise UnavailableError(f"cannot mount {mountpoint}: {error}") from None
        tag = live.tag if read_only else live.commit()
    return ShieldReport(tag, operations.failures)

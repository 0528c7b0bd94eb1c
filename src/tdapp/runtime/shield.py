"""The file system shield: a volume mounted with FUSE, decrypted and verified as it is read.

:func:`serve_volume` mounts a :class:`~tdapp.volume.live.LiveVolume` at a folder
(libfuse 3 through mfusepy, one thread) until it is unmounted, then commits and
returns the new tag and every read that was refused. A chunk that fails
authentication is EIO to the program and a named failure for the runtime,
never wrong bytes. Hard and symbolic links, devices and extended attributes
are not part of a volume and fail with their proper errno. This module owns
only the mapping from FUSE calls to the live volume; it must never decide on
its own what is trusted, and never let a failed chunk pass.

:class:`ShieldMount` runs one ``tdapp volume mount`` child per volume and hands it
the key and tag over an inherited pipe (``--key-fd``, :func:`key_message`), never
in its command line or environment, where other local users or any process of
the same user could read them.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from ctypes.util import find_library
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

from tdapp.errors import TdappError, UnavailableError, UsageError
from tdapp.volume import Volume
from tdapp.volume.keys import VolumeKey, VolumeTag
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

    def __init__(self, live: LiveVolume, *, read_only: bool) -> None:
        self.live, self.read_only = live, read_only
        self.failures: list[str] = []
        self.mounted = False
        self._handles: dict[str, int] = {}
        self._uid, self._gid = os.getuid(), os.getgid()

    def init_with_config(self, conn_info: Any, config: Any) -> None:
        self.mounted = True
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
    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
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
    fuse = _fuse()
    with volume.live() as live:
        operations = ShieldOperations(live, read_only=read_only)
        options: dict[str, Any] = {"foreground": True, "nothreads": True, "fsname": "tdapp",
                                   "subtype": "tdapp", "default_permissions": True,
                                   "max_read": MAX_IO}
        if allow_other:
            options["allow_other"] = True
        if read_only:
            options["ro"] = True
        if ready is not None:
            ready.set()
        try:
            with _unmount_on_signal(mountpoint):
                fuse.FUSE(operations, str(mountpoint), **options)
        except RuntimeError as error:
            # libfuse also reports an ending by SIGTERM or SIGINT as an error; once mounted,
            # that is an unmount like any other, and what was written is sealed below.
            if not operations.mounted:
                raise UnavailableError(f"cannot mount {mountpoint}: {error}") from None
        tag = live.tag if read_only else live.commit()
    return ShieldReport(tag, operations.failures)


# -- the runtime's side: one ``tdapp volume mount`` child per volume ------------------------

class ShieldKind(StrEnum):
    """How a volume reaches the program (``tdapp run --shield``)."""

    AUTO = "auto"  # FUSE for volumes over AUTO_THRESHOLD when FUSE works, else tmpfs
    FUSE = "fuse"  # decrypted on the fly by a `tdapp volume mount` child
    TMPFS = "tmpfs"  # decrypted whole into memory before the program starts


AUTO_THRESHOLD = 64 * 1024 * 1024  # sealed bytes above which auto mounts instead of staging
MOUNT_TIMEOUT_S = 30.0


@functools.cache
def fuse_usable() -> bool:
    """Whether this machine can mount FUSE file systems (device, helper and library)."""
    return (os.access("/dev/fuse", os.R_OK | os.W_OK) and shutil.which("fusermount3") is not None
            and find_library("fuse3") is not None)


def unmount_abandoned(work: Path) -> None:
    """Take down mounts left under a killed run's work folder, before it is removed."""
    for mountpoint in (work / "mnt").glob("*"):
        if os.path.ismount(mountpoint):
            subprocess.run(["fusermount3", "-uz", str(mountpoint)], check=False,
                           capture_output=True, timeout=60)


_KEY_FIELDS = ("VOLUME_KEY", "VOLUME_TAG")
_KEY_MESSAGE_MAX = 4096


def key_message(key: VolumeKey, tag: VolumeTag) -> bytes:
    """What ``--key-fd`` reads: the lines ``VOLUME_KEY=<hex>`` and ``VOLUME_TAG=<hex>``."""
    return f"VOLUME_KEY={key.hex()}\nVOLUME_TAG={tag.hex()}\n".encode()


def read_key_message(fd: int) -> tuple[VolumeKey, VolumeTag]:
    """Read a :func:`key_message` from ``fd`` to its end, and close ``fd``."""
    data = b""
    try:
        while len(data) <= _KEY_MESSAGE_MAX and (chunk := os.read(fd, 1024)):
            data += chunk
    except OSError as error:
        raise UsageError(f"cannot read the key from descriptor {fd}: {error.strerror}") from None
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
    lines = data.decode("ascii", errors="replace").splitlines()
    fields = {name: value for name, _, value in (line.partition("=") for line in lines)}
    if len(data) > _KEY_MESSAGE_MAX or len(lines) != 2 or sorted(fields) != sorted(_KEY_FIELDS):
        raise UsageError(f"descriptor {fd} must hold exactly the lines VOLUME_KEY=<64 hex> "
                         "and VOLUME_TAG=<32 hex>")
    return VolumeKey.from_hex(fields["VOLUME_KEY"]), VolumeTag.from_hex(fields["VOLUME_TAG"])


def sealed_size(folder: Path) -> int:
    return sum(entry.stat().st_size for entry in folder.rglob("*") if entry.is_file())


class ShieldMount:
    """A volume mounted by a child ``tdapp volume mount`` until :meth:`finish`."""

    def __init__(self, name: str, folder: Path, mountpoint: Path, key: str, tag: str) -> None:
        self.name, self.folder, self.mountpoint, self.tag = name, folder, mountpoint, tag
        self._finished = False
        self._report = mountpoint.with_name(f"{mountpoint.name}.report.json")
        self._log = mountpoint.with_name(f"{mountpoint.name}.log")
        message = key_message(VolumeKey.from_hex(key), VolumeTag.from_hex(tag))
        mountpoint.mkdir(parents=True)
        # The key goes over a pipe: argv is public and the environment is readable by every
        # process of this user; the child must not find a key of the runtime's there either.
        environment = {name: value for name, value in os.environ.items()
                       if name not in _KEY_FIELDS}
        key_read, key_write = os.pipe()
        try:
            try:
                os.write(key_write, message)  # far below a pipe's buffer: never blocks
            finally:
                os.close(key_write)
            with self._log.open("wb") as log:
                self._process = subprocess.Popen(
                    [sys.executable, "-m", "tdapp", "volume", "mount", str(folder),
                     str(mountpoint), "--key-fd", str(key_read), "--allow-other",
                     "--die-with-parent", "--report", str(self._report)],
                    env=environment, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                    stderr=log, start_new_session=True, pass_fds=[key_read])
        finally:
            os.close(key_read)
        deadline = time.monotonic() + MOUNT_TIMEOUT_S
        while not os.path.ismount(mountpoint):
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.abort()
                raise UnavailableError(f"volume {name}: the shield did not mount: "
                                       f"{self._last_line()}")
            time.sleep(0.02)

    def _last_line(self) -> str:
        lines = self._log.read_text(errors="replace").strip().splitlines()
        return lines[-1] if lines else "no message"

    def finish(self) -> ShieldReport:
        """Unmount, let the child seal what changed, and return its report."""
        subprocess.run(["fusermount3", "-u", str(self.mountpoint)], check=False,
                       capture_output=True, timeout=60)
        try:
            self._process.wait(timeout=300)
        except subprocess.TimeoutExpired:
            self.abort()
            raise UnavailableError(f"volume {self.name}: the shield did not finish") from None
        if not self._report.exists():
            raise UnavailableError(f"volume {self.name}: the shield failed: {self._last_line()}")
        document = json.loads(self._report.read_text())
        self._finished = True
        return ShieldReport(VolumeTag.from_hex(document["tag"]), list(document["failures"]))

    def abort(self) -> None:
        """Take the mount down whatever state it is in (nothing of it is published)."""
        if self._finished:
            return  # unmounted and sealed: nothing to take down
        subprocess.run(["fusermount3", "-uz", str(self.mountpoint)], check=False,
                       capture_output=True, timeout=60)
        if self._process.poll() is None:
            self._process.kill()
            self._process.wait(timeout=30)

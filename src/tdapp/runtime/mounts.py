"""The runtime's side of the shield: one ``tdapp volume mount`` child per volume.

:class:`ShieldMount` runs the child (:func:`tdapp.runtime.shield.serve_volume` in
it) and hands it the key and tag over an inherited pipe (``--key-fd``,
:func:`key_message`), never in its command line or environment, where other
local users or any process of the same user could read them. :class:`ShieldKind`
is how a volume reaches the program. Must never pass a key any other way.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import subprocess
import sys
import time
from ctypes.util import find_library
from enum import StrEnum
from pathlib import Path

from tdapp.errors import UnavailableError, UsageError
from tdapp.runtime.shield import ShieldReport
from tdapp.volume.keys import VolumeKey, VolumeTag


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

    def __init__(self, name: str, folder: Path, mountpoint: Path, key: str, tag: str, *,
                 read_only: bool = False) -> None:
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
                     "--die-with-parent", "--report", str(self._report),
                     *(["--read-only"] if read_only else [])],
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

"""Running an app folder's own build (``make`` or ``build.sh``) reproducibly, on a copy.

Owns the build environment (docs/measurement.md, "Reproducible builds"): the
folder is copied into a private temporary build folder with every timestamp
set to :data:`SOURCE_DATE_EPOCH`, and the build runs there with a fixed
environment, so the same sources give the same bytes whoever builds them,
wherever, whenever. Must never write into the user's folder, nor hand the
build anything of the user's environment but ``PATH`` and ``HOME``.
"""

from __future__ import annotations

import collections
import os
import re
import shutil
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

from tdapp.errors import InputError

SOURCE_DATE_EPOCH = 315532800
"""1980-01-01T00:00:00Z: fixed, so no source timestamp reaches the output. Not 0,
because 1980 is the earliest time zip archives (and Python's zipfile) can store,
and a build may pack its copied sources."""

MAKEFILES = ("GNUmakefile", "makefile", "Makefile")  # make's own search order
BUILD_SCRIPT = "build.sh"
_TAIL_LINES = 3
_ERROR = re.compile(r"\berror\b", re.IGNORECASE)
_SOURCE_ECHO = re.compile(r"\s*[0-9]*\s*\|")  # gcc's quoted source lines: "  55 |  return 0"
_TAIL_CHARS = 400

Output = Callable[[str], None]
"""Receives each line the build prints (stdout and stderr interleaved)."""


def copy_sources(app_dir: Path, target: Path) -> None:
    """Copy ``app_dir`` to the new folder ``target``: content, modes, symlinks; fixed times."""
    if not app_dir.is_dir():
        raise InputError(f"{app_dir} is not a folder")
    os.mkdir(target, 0o700)
    _copy_folder(str(app_dir), str(target))
    os.chmod(target, stat.S_IMODE(app_dir.stat().st_mode) | stat.S_IRWXU)
    os.utime(target, (SOURCE_DATE_EPOCH, SOURCE_DATE_EPOCH))


def _copy_folder(source: str, target: str) -> None:
    try:
        with os.scandir(source) as iterator:
            children = sorted(iterator, key=lambda entry: entry.name)
    except OSError as error:
        raise InputError(f"cannot read {source}: {error.strerror}") from None
    times = (SOURCE_DATE_EPOCH, SOURCE_DATE_EPOCH)
    for child in children:
        destination = os.path.join(target, child.name)
        info = child.stat(follow_symlinks=False)
        if stat.S_ISDIR(info.st_mode):
            os.mkdir(destination, 0o700)
            _copy_folder(child.path, destination)
            os.chmod(destination, stat.S_IMODE(info.st_mode) | stat.S_IRWXU)
        elif stat.S_ISREG(info.st_mode):
            try:
                shutil.copyfile(child.path, destination, follow_symlinks=False)
            except OSError as error:
                raise InputError(f"cannot read {child.path}: {error.strerror}") from None
            os.chmod(destination, stat.S_IMODE(info.st_mode) | stat.S_IRUSR)
        elif stat.S_ISLNK(info.st_mode):
            # Kept as a link for the build; the image itself refuses links.
            os.symlink(os.readlink(child.path), destination)
        else:
            raise InputError(f"{child.path} is not a regular file, folder or symbolic link")
        os.utime(destination, times, follow_symlinks=False)


def build_command(folder: Path) -> list[str] | None:
    """The build a folder asks for: ``make`` when it has a makefile, else ``build.sh``."""
    if any((folder / name).is_file() for name in MAKEFILES):
        # -B: remake every target, so a stale output left in the user's folder is never used.
        return ["make", "--no-print-directory", "-B", "-C", str(folder)]
    if (folder / BUILD_SCRIPT).is_file():
        return ["/bin/sh", BUILD_SCRIPT]
    return None


def build_environment(build_dir: Path) -> dict[str, str]:
    """The whole environment of a build: fixed values, plus the user's PATH and HOME."""
    prefix_map = f"-ffile-prefix-map={build_dir}=. -fdebug-prefix-map={build_dir}=."
    # -Wdate-time points at __DATE__/__TIME__, which would otherwise tie output to a clock.
    flags = f"{prefix_map} -Wdate-time"
    return {
        "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", "/nonexistent"),
        "SOURCE_DATE_EPOCH": str(SOURCE_DATE_EPOCH),
        "LC_ALL": "C",
        "LANG": "C",
        "TZ": "UTC",
        "CFLAGS": flags,
        "CXXFLAGS": flags,
        "PYTHONHASHSEED": "0",
    }


def run_build(app_dir: Path, build_dir: Path, output: Output) -> bool:
    """Run the build of the copy in ``build_dir``; False when there is nothing to build.

    A failed build raises :class:`InputError` with the exit status and the last
    lines it printed (all of which ``output`` has already received).
    """
    command = build_command(build_dir)
    if command is None:
        return False
    tool = "make" if command[0] == "make" else BUILD_SCRIPT
    tail: collections.deque[str] = collections.deque(maxlen=50)
    first_error: str | None = None
    try:
        process = subprocess.Popen(
            command, cwd=build_dir, env=build_environment(build_dir), umask=0o022,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    except FileNotFoundError:
        raise InputError(f"{command[0]} is not installed; it is needed to build {app_dir}") \
            from None
    assert process.stdout is not None
    try:
        for raw in process.stdout:
            line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
            tail.append(line)
            if first_error is None and _ERROR.search(line):
                first_error = line.strip()
            output(line)
        status = process.wait()
    except BaseException:
        process.kill()
        process.wait()
        raise
    finally:
        process.stdout.close()
    if status != 0:
        how = (f"was killed by signal {-status}" if status < 0
               else f"exited with status {status}")
        raise InputError(f"build of {app_dir} failed: {tool} {how}: "
                         f"{_summary(first_error, tail)}")
    return True


def _summary(first_error: str | None, lines: collections.deque[str]) -> str:
    """The first error line and the last lines of output, on one line."""
    meaningful = [line.strip() for line in lines
                  if any(char.isalnum() for char in line) and not _SOURCE_ECHO.match(line)]
    kept = meaningful[-_TAIL_LINES:]
    if first_error is not None and first_error not in kept:
        # The compiler's first complaint says most; make's own last line only says it stopped.
        kept = [first_error, *kept[-(_TAIL_LINES - 1):]]
    text = " | ".join(kept) if kept else "(no output)"
    return text if len(text) <= _TAIL_CHARS else "…" + text[-_TAIL_CHARS:]

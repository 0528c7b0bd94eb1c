"""Plain file trees on the host side of a volume: reading a source, placing an extraction.

Reading refuses anything that is not a regular file or a folder (symlinks,
devices, sockets) and names a volume may not hold, so a volume never captures
something outside its source; it keeps only permission bits (never setuid,
setgid or sticky).
Placing builds the whole extraction in a private staging folder inside the
target and moves it into place only after every file was verified; it never
follows a symlink that already sits in the target.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tdapp.errors import InputError
from tdapp.volume.fspf import PERMISSION_BITS
from tdapp.volume.paths import check_name, check_relative, escape_path


@dataclass(frozen=True)
class SourceEntry:
    """A regular file or folder found under a source root."""

    relative: str
    absolute: str
    is_dir: bool
    size: int
    mode: int
    mtime_ns: int


def scan_source(root: Path) -> list[SourceEntry]:
    """Every folder and regular file under ``root`` (root excluded), sorted by path.

    Modes keep only the permission bits: a setuid, setgid or sticky bit is dropped.
    """
    if not root.is_dir():
        raise InputError(f"source {root} is not a folder")
    entries: list[SourceEntry] = []
    pending = [(str(root), "")]
    while pending:  # a loop, not recursion: a source tree may be deeper than Python's stack
        directory, prefix = pending.pop()
        for entry in _scan_folder(directory, prefix):
            entries.append(entry)
            if entry.is_dir:
                pending.append((entry.absolute, entry.relative + "/"))
    entries.sort(key=lambda entry: entry.relative)
    return entries


def _scan_folder(directory: str, prefix: str) -> Iterator[SourceEntry]:
    try:
        with os.scandir(directory) as iterator:
            children = list(iterator)
    except OSError as error:
        raise InputError(f"cannot read {escape_path(directory)}: {error.strerror}") from None
    for child in children:
        relative = check_relative(prefix + check_name(child.name, directory), child.path)
        info = child.stat(follow_symlinks=False)
        kind = stat.S_IFMT(info.st_mode)
        if kind == stat.S_IFLNK:
            raise InputError(f"{escape_path(child.path)} is a symbolic link; "
                             "volumes hold only files and folders")
        if kind not in (stat.S_IFREG, stat.S_IFDIR):
            raise InputError(f"{escape_path(child.path)} is not a regular file or folder")
        yield SourceEntry(relative, child.path, kind == stat.S_IFDIR, info.st_size,
                          stat.S_IMODE(info.st_mode) & PERMISSION_BITS, info.st_mtime_ns)


def open_source(entry: SourceEntry) -> int:
    """Open a source file without following a symlink swapped in since the scan."""
    try:
        return os.open(entry.absolute, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise InputError(f"cannot read {escape_path(entry.absolute)}: {exc.strerror}") \
            from None


class Staging:
    """A private folder inside the target where an extraction is assembled."""

    def __init__(self, target: Path) -> None:
        if target.exists() and not target.is_dir():
            raise InputError(f"output {target} exists and is not a folder")
        self._created = [parent for parent in (target, *target.parents) if not parent.exists()]
        target.mkdir(parents=True, exist_ok=True)
        self.target = target
        self.root = target / f".tdapp-extract-{os.urandom(6).hex()}"
        self.root.mkdir(mode=0o700)
        self._prefix = f"{self.root}/"

    def path(self, relative: str) -> Path:
        return self.root / relative

    def make_folders(self, folders: Iterable[str]) -> None:
        """Make these folders and every parent they need, each exactly once."""
        needed: set[str] = set()
        for folder in folders:
            while folder and folder not in needed:
                needed.add(folder)
                folder = folder.rpartition("/")[0]
        for folder in sorted(needed):  # a parent sorts before its children
            os.mkdir(self._prefix + folder)

    def create_file(self, relative: str) -> int:
        """Create a new file; its folder must already have been made."""
        return os.open(
            self._prefix + relative,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
        )

    def discard(self) -> None:
        """Remove the staging folder and any folder made for it: the target is as before."""
        shutil.rmtree(self.root, ignore_errors=True)
        for folder in self._created:
            with contextlib.suppress(OSError):
                folder.rmdir()

    def publish(self) -> None:
        """Move everything staged into the target; checks every conflict before moving."""
        conflicts = list(_conflicts(self.root, self.target))
        if conflicts:
            raise InputError(f"cannot extract into {self.target}: {conflicts[0]}")
        _merge(self.root, self.target)
        self.root.rmdir()


def _is_real_dir(path: Path) -> bool:
    try:
        return stat.S_ISDIR(path.lstat().st_mode)
    except FileNotFoundError:
        return False


def _conflicts(source: Path, target: Path) -> Iterator[str]:
    for entry in os.scandir(source):
        destination = target / entry.name
        if not os.path.lexists(destination):
            continue
        if entry.is_dir(follow_symlinks=False):
            if _is_real_dir(destination):
                yield from _conflicts(Path(entry.path), destination)
            else:
                yield f"{destination} is in the way of a folder"
        elif _is_real_dir(destination):
            yield f"{destination} is a folder in the way of a file"


def _merge(source: Path, target: Path) -> None:
    for entry in os.scandir(source):
        destination = target / entry.name
        if entry.is_dir(follow_symlinks=False) and _is_real_dir(destination):
            _merge(Path(entry.path), destination)
            with contextlib.suppress(OSError):
                Path(entry.path).rmdir()
        else:
            os.replace(entry.path, destination)

"""The volume API: create, open, add, verify, extract.

A :class:`Volume` object can only be obtained by creating a volume or by
opening one with its key *and* the tag the caller expects, so every use of a
volume starts from authenticated, fresh state. Each file is written under a
fresh random key and object name; the FSPF is replaced last, atomically. This
module must never return plaintext from a chunk that did not authenticate, nor
leave a volume half-written.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from tdapp.errors import ConflictError, InputError, IntegrityError, TdappError, UsageError
from tdapp.volume.chunks import (
    FileSealer,
    new_object_id_and_key,
    open_stream,
    seal_stream,
    write_all,
)
from tdapp.volume.fspf import (
    DEFAULT_CHUNK_SIZE,
    MAX_CHUNK_SIZE,
    MIN_CHUNK_SIZE,
    DirEntry,
    FileEntry,
    Manifest,
    open_fspf,
    read_tag,
    seal_fspf,
)
from tdapp.volume.keys import VolumeKey, VolumeTag
from tdapp.volume.layout import VolumeFolder, open_regular_file
from tdapp.volume.live import LiveVolume
from tdapp.volume.regions import RegionKind, RegionMap
from tdapp.volume.tree import SourceEntry, Staging, open_source, scan_source

Progress = Callable[[int], None]
"""Called with a number of plaintext bytes just processed."""


def _no_progress(_: int) -> None:
    return None


@dataclass(frozen=True)
class FileInfo:
    """What ``show`` tells about one file; never the file's key."""

    path: str
    region: RegionKind
    size: int
    mode: int


@dataclass(frozen=True)
class VerifyReport:
    files: int
    bytes: int


class Volume:
    """An authenticated, fresh view of one volume folder."""

    def __init__(self, folder: VolumeFolder, key: VolumeKey, manifest: Manifest,
                 tag: VolumeTag, *, _token: object = None) -> None:
        if _token is not _CONSTRUCT:
            raise TypeError("use Volume.create() or Volume.open()")
        self._folder = folder
        self._key = key
        self._manifest = manifest
        self._tag = tag

    # -- obtaining a volume ---------------------------------------------------

    @classmethod
    def create(cls, root: Path, key: VolumeKey, *, source: Path | None = None,
               regions: RegionMap | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE,
               progress: Progress = _no_progress) -> Volume:
        """Make a new volume in an empty or missing folder, optionally filled from ``source``."""
        if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
            raise UsageError(
                f"chunk size must be between {MIN_CHUNK_SIZE} and {MAX_CHUNK_SIZE} bytes"
            )
        entries = scan_source(source) if source is not None else []
        folder = VolumeFolder(root)
        created_root = not root.exists()
        folder.ensure_new()
        empty = Manifest(chunk_size, 0, regions or RegionMap.build([]), {}, {})
        try:
            with folder.locked(exclusive=True):
                volume = cls(folder, key, empty, VolumeTag(bytes(16)), _token=_CONSTRUCT)
                volume._write(entries, progress)
        except BaseException:
            folder.remove_new(remove_root=created_root)
            raise
        return volume

    @classmethod
    def open(cls, root: Path, key: VolumeKey, tag: VolumeTag, *,
             name: str | None = None) -> Volume:
        """Open a volume, refusing a wrong key, a stale tag or a tampered FSPF.

        ``name`` (a session's volume name) prefixes any refusal, so a user knows
        which of several volumes it was.
        """
        folder = VolumeFolder(root)
        try:
            manifest = open_fspf(folder.read_fspf(), key, tag)
        except TdappError as error:
            if name is not None:
                error.message = f"volume {name}: {error.message}"
            raise
        return cls(folder, key, manifest, tag, _token=_CONSTRUCT)

    # -- reading ----------------------------------------------------------------

    @property
    def tag(self) -> VolumeTag:
        return self._tag

    @property
    def chunk_size(self) -> int:
        return self._manifest.chunk_size

    @property
    def regions(self) -> list[tuple[str, RegionKind]]:
        return self._manifest.regions.as_list()

    def files(self) -> list[FileInfo]:
        """Protected files from the FSPF, then not-protected files found under ``plain/``."""
        listed = [FileInfo(path, entry.region, entry.size, entry.mode)
                  for path, entry in sorted(self._manifest.files.items())]
        unlisted = [FileInfo(entry.relative, RegionKind.NOT_PROTECTED, entry.size, entry.mode)
                    for entry in self._plain_entries() if not entry.is_dir]
        return listed + unlisted

    def read(self, path: str) -> Iterator[bytes]:
        """Yield the verified plaintext of one protected file, chunk by chunk."""
        entry = self._manifest.files.get(path)
        if entry is None:
            raise InputError(f"{path} is not a protected file of this volume")
        yield from self._open_chunks(path, entry)

    def verify(self, progress: Progress = _no_progress) -> VerifyReport:
        """Authenticate every chunk of every file and the folder's exact content."""
        with self._folder.locked(exclusive=False):
            self._check_still_current()
            self._check_folder_content()
            total = 0
            for path, entry in sorted(self._manifest.files.items()):
                for plaintext in self._open_chunks(path, entry):
                    total += len(plaintext)
                    progress(len(plaintext))
        return VerifyReport(files=len(self._manifest.files), bytes=total)

    def extract(self, target: Path, progress: Progress = _no_progress) -> VerifyReport:
        """Write the plaintext tree into ``target``; nothing appears there unless all verified."""
        with self._folder.locked(exclusive=False):
            self._check_still_current()
            self._check_folder_content()
            staging = Staging(target)
            try:
                total = self._extract_into(staging, progress)
                staging.publish()
            except BaseException:
                staging.discard()
                raise
        self._apply_dir_metadata(target)
        return VerifyReport(files=len(self._manifest.files), bytes=total)

    # -- writing ----------------------------------------------------------------

    def add(self, source: Path, progress: Progress = _no_progress) -> VolumeTag:
        """Add or replace the files of ``source``; returns the volume's new tag."""
        entries = scan_source(source)
        with self._folder.locked(exclusive=True):
            self._check_still_current()
            self._write(entries, progress)
        return self._tag

    @contextlib.contextmanager
    def live(self) -> Iterator[LiveVolume]:
        """The volume as a live file tree (for the file system shield), held exclusively;
        nothing changes on disk until its ``commit()``."""
        with self._folder.locked(exclusive=True):
            self._check_still_current()
            yield LiveVolume(self._folder, self._key, self._manifest, self._tag)

    # -- internals ----------------------------------------------------------------

    def _check_still_current(self) -> None:
        current = read_tag(self._folder.read_fspf())
        if current != self._tag:
            raise ConflictError(
                f"{self._folder.root} changed since it was opened (tag {current.hex()}, "
                f"opened at {self._tag.hex()})"
            )

    def _open_chunks(self, path: str, entry: FileEntry) -> Iterator[bytes]:
        sealer = FileSealer(path, entry, self.chunk_size)
        try:
            fd = open_regular_file(self._folder.object_path(entry.object_name))
        except FileNotFoundError:
            raise IntegrityError(f"{path} is missing from the volume (stored object deleted)") \
                from None
        except IntegrityError as error:
            raise IntegrityError(f"stored object of {path}: {error}") from None
        try:
            yield from open_stream(fd, sealer, entry.size)
        finally:
            os.close(fd)

    def _plain_entries(self) -> list[SourceEntry]:
        if not self._folder.plain.is_dir():
            return []
        return scan_source(self._folder.plain)

    def _check_folder_content(self) -> None:
        unexpected = self._folder.unexpected_entries()
        if unexpected:
            raise IntegrityError(f"unexpected entry {unexpected[0]!r} in the volume folder")
        referenced = {entry.object_name for entry in self._manifest.files.values()}
        extra = sorted(self._folder.stored_objects() - referenced)
        if extra:
            raise IntegrityError(
                f"unexpected stored object objects/{extra[0]} not listed in volume.fspf "
                "(a file was added)"
            )
        for entry in self._plain_entries():
            # Folders under plain/ may be parents of a nested not-protected region.
            if not entry.is_dir and self._manifest.regions.kind_of(entry.relative).protected:
                raise IntegrityError(
                    f"plain/{entry.relative} lies in a protected region and is not in the volume"
                )

    def _extract_into(self, staging: Staging, progress: Progress) -> int:
        total = 0
        plain = self._plain_entries()
        staging.make_folders([
            *self._manifest.dirs,
            *(path.rpartition("/")[0] for path in self._manifest.files),
            *(e.relative if e.is_dir else e.relative.rpartition("/")[0] for e in plain),
        ])
        for path, entry in sorted(self._manifest.files.items()):
            fd = staging.create_file(path)
            try:
                for plaintext in self._open_chunks(path, entry):
                    write_all(fd, plaintext)
                    total += len(plaintext)
                    progress(len(plaintext))
                os.fchmod(fd, entry.mode)
                os.utime(fd, ns=(entry.mtime_ns, entry.mtime_ns))
            finally:
                os.close(fd)
        for source in plain:
            if not source.is_dir:
                shutil.copy2(source.absolute, staging.path(source.relative),
                             follow_symlinks=False)
        return total

    def _apply_dir_metadata(self, target: Path) -> None:
        # Deepest first, so that a read-only parent does not block its children.
        for path, entry in sorted(self._manifest.dirs.items(), reverse=True):
            directory = target / path
            os.chmod(directory, entry.mode, follow_symlinks=False)
            os.utime(directory, ns=(entry.mtime_ns, entry.mtime_ns), follow_symlinks=False)

    def _write(self, entries: Iterable[SourceEntry], progress: Progress) -> None:
        regions = self._manifest.regions
        files = dict(self._manifest.files)
        dirs = dict(self._manifest.dirs)
        entries = list(entries)
        self._check_tree_shape(entries)
        obsolete = self._folder.stored_objects() - {e.object_name for e in files.values()}
        written: set[str] = set()
        try:
            for source in entries:
                kind = regions.kind_of(source.relative)
                if not kind.protected:
                    self._write_plain(source)
                elif source.is_dir:
                    dirs[source.relative] = DirEntry(source.mode, source.mtime_ns)
                else:
                    replaced = files.get(source.relative)
                    files[source.relative] = self._seal_file(source, kind, written, progress)
                    if replaced is not None:
                        obsolete.add(replaced.object_name)
        except BaseException:
            self._folder.remove_objects(written)
            raise
        manifest = replace(self._manifest, generation=self._manifest.generation + 1,
                           files=files, dirs=dirs)
        data, tag = seal_fspf(manifest, self._key)
        self._folder.commit_fspf(data)
        self._manifest, self._tag = manifest, tag
        self._folder.remove_objects(obsolete)

    def _check_tree_shape(self, entries: list[SourceEntry]) -> None:
        """Refuse an addition that would make one path both a file and a folder."""
        files = set(self._manifest.files)
        files.update(e.relative for e in self._plain_entries() if not e.is_dir)
        folders = set(self._manifest.dirs)
        for entry in entries:
            (folders if entry.is_dir else files).add(entry.relative)
        for path in sorted(files | folders):
            parent = path.rpartition("/")[0]
            while parent:
                folders.add(parent)
                parent = parent.rpartition("/")[0]
        clash = sorted(files & folders)
        if clash:
            raise InputError(
                f"cannot add: {clash[0]} would be both a file and a folder in the volume"
            )

    def _seal_file(self, source: SourceEntry, kind: RegionKind, written: set[str],
                   progress: Progress) -> FileEntry:
        object_id, file_key = new_object_id_and_key()
        entry = FileEntry(region=kind, size=source.size, mode=source.mode,
                          mtime_ns=source.mtime_ns, object_id=object_id, file_key=file_key)
        sealer = FileSealer(source.relative, entry, self.chunk_size)
        source_fd = open_source(source)
        try:
            written.add(entry.object_name)
            object_fd = os.open(self._folder.object_path(entry.object_name),
                                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            try:
                seal_stream(source_fd, object_fd, sealer, source.size, progress)
            finally:
                os.close(object_fd)
        finally:
            os.close(source_fd)
        return entry

    def _write_plain(self, source: SourceEntry) -> None:
        destination = self._folder.plain / source.relative
        if source.is_dir:
            destination.mkdir(parents=True, exist_ok=True)
            return
        destination.parent.mkdir(parents=True, exist_ok=True)
        temporary = destination.with_name(f".{destination.name}.{os.urandom(6).hex()}.tmp")
        try:
            shutil.copy2(source.absolute, temporary, follow_symlinks=False)
            os.replace(temporary, destination)
        finally:
            with contextlib.suppress(FileNotFoundError):
                temporary.unlink()
        os.chmod(destination, stat.S_IMODE(source.mode))


_CONSTRUCT = object()

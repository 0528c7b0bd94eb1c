"""The volume API: create, open, add, verify, extract.

A :class:`Volume` object can only be obtained by creating a volume or by
opening one with its key *and* the tag the caller expects, so every use of a
volume starts from authenticated, fresh state. Each file is written under a
fresh random key and object name; the FSPF is replaced last, atomically. This
module must never return plaintext from a chunk that did not authenticate, nor
leave a volume half-written. ``verify`` and ``extract`` accept exactly the same
volumes: anything in the stored folder the FSPF does not account for (an extra
entry or object, a link, a folder or file under ``plain/`` outside a
not-protected region, a file/folder clash) is refused by both before anything
is written. No setuid, setgid or sticky bit is ever sealed or extracted.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from tdapp.errors import ConflictError, InputError, IntegrityError, TdappError, UsageError
from tdapp.volume.chunks import (
    FileSealer,
    new_object_id_and_key,
    open_stream,
    seal_stream,
)
from tdapp.volume.fspf import (
    DEFAULT_CHUNK_SIZE,
    MAX_CHUNK_SIZE,
    MIN_CHUNK_SIZE,
    PERMISSION_BITS,
    DirEntry,
    FileEntry,
    Manifest,
    open_fspf,
    read_tag,
    seal_fspf,
)
from tdapp.volume.keys import VolumeKey, VolumeTag
from tdapp.volume.layout import PlainEntry, VolumeFolder, copy_content
from tdapp.volume.live import LiveVolume
from tdapp.volume.paths import escape_path, find_clash
from tdapp.volume.pipeline import write_pieces
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
            plain = self._check_folder_content()
            try:
                staging = Staging(target)
            except OSError as error:
                raise InputError(f"cannot extract into {target}: {error.strerror}") from None
            try:
                total = self._extract_into(staging, plain, progress)
                staging.publish()
            except OSError as error:  # the target's file system: too long a name, full, …
                staging.discard()
                where = f" ({escape_path(str(error.filename))})" if error.filename else ""
                raise InputError(f"cannot extract into {target}: {error.strerror}{where}") \
                    from None
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

    def _open_chunks(self, path: str, entry: FileEntry) -> Generator[bytes, None, None]:
        """Verified plaintext of one file, each chunk as soon as it authenticated."""
        with self._open_object(path, entry) as (fd, sealer):
            yield from open_stream(fd, sealer, entry.size)

    @contextlib.contextmanager
    def _open_object(self, path: str, entry: FileEntry) -> Iterator[tuple[int, FileSealer]]:
        sealer = FileSealer(path, entry, self.chunk_size)
        try:
            fd = self._folder.open_object(entry.object_name)
        except FileNotFoundError:
            raise IntegrityError(f"{path} is missing from the volume (stored object deleted)") \
                from None
        except IntegrityError as error:
            raise IntegrityError(f"stored object of {path}: {error}") from None
        try:
            yield fd, sealer
        finally:
            os.close(fd)

    def _plain_entries(self) -> list[PlainEntry]:
        return self._folder.plain_entries()

    def _check_folder_content(self) -> list[PlainEntry]:
        """Refuse anything in the folder the FSPF does not account for; the plain entries."""
        unexpected = self._folder.unexpected_entries()
        if unexpected:
            raise IntegrityError(f"unexpected entry {unexpected[0]!r} in the volume folder")
        referenced = {entry.object_name for entry in self._manifest.files.values()}
        extra = sorted(self._folder.stored_objects() - referenced)
        if extra:
            raise IntegrityError(
                f"unexpected stored object objects/{escape_path(extra[0])} not listed in "
                "volume.fspf (a file was added)"
            )
        regions = self._manifest.regions
        plain = self._plain_entries()
        # A folder in a protected region is there only to hold a nested not-protected
        # region; anything else there is not accounted for. Files first: they say more.
        for entry in sorted(plain, key=lambda entry: entry.is_dir):
            if regions.kind_of(entry.relative).protected and (
                    not entry.is_dir or not regions.leads_to_unprotected(entry.relative)):
                what = " (a folder)" if entry.is_dir else ""
                raise IntegrityError(
                    f"plain/{escape_path(entry.relative)}{what} lies in a protected region "
                    "and is not in the volume"
                )
        clash = find_clash([*self._manifest.files, *(e.relative for e in plain if not e.is_dir)],
                           [*self._manifest.dirs, *(e.relative for e in plain if e.is_dir)])
        if clash is not None:
            raise IntegrityError(f"plain/ makes {escape_path(clash)} both a file and a folder")
        return plain

    def _extract_into(self, staging: Staging, plain: list[PlainEntry],
                      progress: Progress) -> int:
        total = 0
        staging.make_folders([
            *self._manifest.dirs,
            *(path.rpartition("/")[0] for path in self._manifest.files),
            *(e.relative if e.is_dir else e.relative.rpartition("/")[0] for e in plain),
        ])
        for path, entry in sorted(self._manifest.files.items()):
            fd = staging.create_file(path)
            try:
                total += self._extract_file(path, entry, fd, progress)
                os.fchmod(fd, entry.mode & PERMISSION_BITS)
                os.utime(fd, ns=(entry.mtime_ns, entry.mtime_ns))
            finally:
                os.close(fd)
        for found in plain:
            if not found.is_dir:
                self._copy_plain(found, staging)
        return total

    def _extract_file(self, path: str, entry: FileEntry, fd: int, progress: Progress) -> int:
        """Write one file's verified plaintext to ``fd``, each chunk once it authenticated (in
        this thread: a writing thread, and writes of whole batches, measured slower)."""
        with contextlib.closing(self._open_chunks(path, entry)) as chunks:
            for chunk in chunks:
                write_pieces(fd, [chunk])
                progress(len(chunk))
        return entry.size

    def _copy_plain(self, found: PlainEntry, staging: Staging) -> None:
        source = self._folder.open_plain_file(found.relative)
        try:
            target = staging.create_file(found.relative)
            try:
                copy_content(source, target)
                info = os.fstat(source)
                os.fchmod(target, info.st_mode & PERMISSION_BITS)
                os.utime(target, ns=(info.st_atime_ns, info.st_mtime_ns))
            finally:
                os.close(target)
        finally:
            os.close(source)

    def _apply_dir_metadata(self, target: Path) -> None:
        # Deepest first, so that a read-only parent does not block its children.
        for path, entry in sorted(self._manifest.dirs.items(), reverse=True):
            directory = target / path
            os.chmod(directory, entry.mode & PERMISSION_BITS, follow_symlinks=False)
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
        clash = find_clash(files, folders)
        if clash is not None:
            raise InputError(
                f"cannot add: {escape_path(clash)} would be both a file and a folder in "
                "the volume"
            )

    def _seal_file(self, source: SourceEntry, kind: RegionKind, written: set[str],
                   progress: Progress) -> FileEntry:
        object_id, file_key = new_object_id_and_key()
        entry = FileEntry(region=kind, size=source.size, mode=source.mode & PERMISSION_BITS,
                          mtime_ns=source.mtime_ns, object_id=object_id, file_key=file_key)
        sealer = FileSealer(source.relative, entry, self.chunk_size)
        source_fd = open_source(source)
        try:
            written.add(entry.object_name)
            object_fd = self._folder.create_object(entry.object_name)
            try:
                seal_stream(source_fd, object_fd, sealer, source.size, progress)
            finally:
                os.close(object_fd)
        finally:
            os.close(source_fd)
        return entry

    def _write_plain(self, source: SourceEntry) -> None:
        if source.is_dir:
            self._folder.make_plain_folder(source.relative)
            return
        source_fd = open_source(source)
        try:
            self._folder.write_plain_file(source.relative, source_fd, source.mode)
        finally:
            os.close(source_fd)


_CONSTRUCT = object()

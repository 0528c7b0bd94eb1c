"""A volume served as a live file tree (the shield): chunk-wise reads, new versions on write.

:class:`LiveVolume` answers reads of any byte range by authenticating only the
chunks the range covers, and turns every change into a new version of the file
under a fresh key and object; the FSPF is rewritten once, by :meth:`commit`,
which returns the new tag. Its promises: a chunk's plaintext is returned only
after it authenticated; under one file key each chunk index is sealed at most
once (a chunk that must change after it was sealed moves the whole version to a
fresh key first); a chunk is sealed as "not last" only while the file extends
beyond it; nothing in the volume's FSPF changes before commit; no mode keeps a
setuid, setgid or sticky bit (a DApp's ``chmod 06755`` gives 0755); no name is
made that the FSPF may not hold (a control or bidi character: EINVAL). Volumes with
not-protected regions are not served (their plaintext files live outside the
FSPF). Errors about the file tree are :class:`OSError` with an errno; a chunk
that fails authentication is :class:`~tdapp.errors.IntegrityError`. The last
CACHED_CHUNKS verified chunks (at least one read's worth) are served again without
reading the store: a chunk the store changes after it was verified is not seen until it
is read from the store again, and then fails (docs/runtime.md, "What the shield keeps
in memory").
"""

from __future__ import annotations

import errno
import os
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

from tdapp.errors import InputError, IntegrityError
from tdapp.volume.chunks import FileSealer, stored_size
from tdapp.volume.fspf import PERMISSION_BITS, TAG_SIZE, DirEntry, FileEntry, Manifest, seal_fspf
from tdapp.volume.keys import VolumeKey, VolumeTag
from tdapp.volume.layout import VolumeFolder
from tdapp.volume.paths import check_stored_path
from tdapp.volume.regions import RegionKind
from tdapp.volume.version import NewVersion

T = TypeVar("T")
CACHED_CHUNKS = 32  # verified plaintext chunks kept for small sequential reads
DEFAULT_DIR_MODE = 0o755


def _fail(code: int, path: str) -> OSError:
    return OSError(code, os.strerror(code), path)


class LiveVolume:
    """The file tree of one opened volume, changed in place and committed once."""

    def __init__(self, folder: VolumeFolder, key: VolumeKey, manifest: Manifest,
                 tag: VolumeTag) -> None:
        if any(not kind.protected for _, kind in manifest.regions.as_list()):
            raise InputError(f"{folder.root} has not-protected regions, which the file system "
                             "shield does not serve; use the tmpfs shield")
        self._folder, self._key, self._manifest, self.tag = folder, key, manifest, tag
        self._cs = manifest.chunk_size
        # A bundle does not carry empty folders: an empty volume arrives without objects/.
        folder.ensure_objects()
        self._files: dict[str, FileEntry] = dict(manifest.files)
        self._dirs: dict[str, DirEntry] = dict(manifest.dirs)
        self._pending: dict[str, NewVersion] = {}
        self._obsolete: set[str] = set()
        self._changed = False
        self._readers: dict[str, tuple[int, FileSealer]] = {}
        self._cache: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self._stored = bytearray()  # sealed bytes of one read, reused from read to read

    @property
    def folder_root(self) -> Path:
        return self._folder.root

    # -- the tree ---------------------------------------------------------------------

    @staticmethod
    def _relative(path: str) -> str:
        return path.strip("/")

    def _children(self, folder: str) -> Iterator[tuple[str, bool]]:
        prefix = f"{folder}/" if folder else ""
        for names, is_dir in ((self._files, False), (self._pending, False), (self._dirs, True)):
            for path in names:
                if path.startswith(prefix) and path != folder:
                    rest = path[len(prefix):]
                    yield rest.split("/", 1)[0], is_dir or "/" in rest

    def is_dir(self, path: str) -> bool:
        relative = self._relative(path)
        return relative == "" or relative in self._dirs or any(self._children(relative))

    def is_file(self, path: str) -> bool:
        relative = self._relative(path)
        return relative in self._pending or relative in self._files

    def stat(self, path: str) -> tuple[bool, int, int, int]:
        """(is a folder, size, permission bits, mtime in ns) of ``path``; ENOENT if absent."""
        relative = self._relative(path)
        if relative in self._pending:
            version = self._pending[relative]
            return False, version.size, version.mode, version.mtime_ns
        if relative in self._files:
            entry = self._files[relative]
            return False, entry.size, entry.mode, entry.mtime_ns
        if self.is_dir(relative):
            folder = self._dirs.get(relative)
            mode = folder.mode if folder is not None else DEFAULT_DIR_MODE
            return True, 0, mode, folder.mtime_ns if folder is not None else 0
        raise _fail(errno.ENOENT, path)

    def listdir(self, path: str) -> list[str]:
        if not self.is_dir(path):
            raise _fail(errno.ENOTDIR if self.is_file(path) else errno.ENOENT, path)
        return sorted({name for name, _ in self._children(self._relative(path))})

    # -- reading ------------------------------------------------------------------------

    def read(self, path: str, offset: int, size: int) -> bytes:
        buffer = bytearray(size)
        return bytes(memoryview(buffer)[:self.read_into(path, offset, memoryview(buffer))])

    def read_into(self, path: str, offset: int, out: memoryview) -> int:
        """Fill ``out`` with the file's bytes from ``offset``; how many there were.

        Each chunk is copied into ``out`` once, after it authenticated (the shield's FUSE
        read hands its reply buffer straight in: no joined copy of the whole range).
        """
        relative = self._relative(path)
        version = self._pending.get(relative)
        entry = self._files.get(relative)
        if version is None and entry is None:
            raise _fail(errno.EISDIR if self.is_dir(relative) else errno.ENOENT, path)
        total = version.size if version is not None else entry.size  # type: ignore[union-attr]
        end = min(offset + len(out), total)
        if offset >= end:
            return 0
        cs = self._cs
        first_index, last_index = offset // cs, (end - 1) // cs
        if version is None:
            self._load(relative, entry, first_index, last_index)  # type: ignore[arg-type]
        for index in range(first_index, last_index + 1):
            plaintext = (version.chunk(index) if version is not None
                         else self._committed_chunk(relative, entry, index))  # type: ignore[arg-type]
            start = index * cs
            first, last = max(offset, start), min(end, start + cs)
            out[first - offset:last - offset] = memoryview(plaintext)[first - start:last - start]
        return end - offset

    def partly_read_chunks(self, path: str, offset: int, size: int) -> list[tuple[int, bytes]]:
        """The chunks a read of ``size`` bytes at ``offset`` covered only in part, as (start,
        verified plaintext), for a file not changed since the mount; taken from the cache of
        authenticated chunks, so only what authenticated (nothing if it is gone)."""
        entry = self._files.get(self._relative(path))
        if entry is None or self._relative(path) in self._pending or size <= 0:
            return []
        cs, end = self._cs, min(offset + size, entry.size)
        partial = []
        for index in sorted({offset // cs, (end - 1) // cs}):
            start = index * cs
            if offset > start or end < min(start + cs, entry.size):
                cached = self._cache.get((entry.object_name, index))
                if cached is not None:
                    partial.append((start, cached))
        return partial

    def _load(self, path: str, entry: FileEntry, first: int, last: int) -> None:
        """Authenticate chunks ``first``..``last`` not yet cached, read with one ``preadv``
        into a buffer kept for it: a read of 1 MiB is one system call, not sixteen."""
        missing = [index for index in range(first, last + 1)
                   if (entry.object_name, index) not in self._cache]
        if len(missing) < 2:
            return  # _committed_chunk reads a single chunk itself
        begin, stop = missing[0], missing[-1]
        stride = self._cs + TAG_SIZE
        length = min((stop + 1) * self._cs, entry.size) - begin * self._cs \
            + (stop - begin + 1) * TAG_SIZE
        if len(self._stored) < length:
            self._stored = bytearray(length)
        fd, sealer = self._reader(path, entry)
        view = memoryview(self._stored)
        got = os.preadv(fd, [view[:length]], begin * stride)
        for index in range(begin, stop + 1):
            at = (index - begin) * stride
            # A short read (the object shrank under us) leaves the tail unauthenticatable.
            stored = view[at:min(at + stride, got)]
            self._remember((entry.object_name, index), sealer.open(index, stored),
                           keep=stop - begin + 1)

    def _committed_chunk(self, path: str, entry: FileEntry, index: int) -> bytes:
        key = (entry.object_name, index)
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            return cached
        fd, sealer = self._reader(path, entry)
        length = min(self._cs, entry.size - index * self._cs) + TAG_SIZE
        stored = os.pread(fd, length, index * (self._cs + TAG_SIZE))
        plaintext = sealer.open(index, stored)
        self._remember(key, plaintext)
        return plaintext

    def _remember(self, key: tuple[str, int], plaintext: bytes, keep: int = 0) -> None:
        """Keep a verified chunk: at least ``keep`` (one request's worth) and CACHED_CHUNKS."""
        self._cache[key] = plaintext
        self._cache.move_to_end(key)
        while len(self._cache) > max(CACHED_CHUNKS, keep):
            self._cache.popitem(last=False)

    def _reader(self, path: str, entry: FileEntry) -> tuple[int, FileSealer]:
        opened = self._readers.get(entry.object_name)
        if opened is None:
            try:
                fd = self._folder.open_object(entry.object_name)
            except FileNotFoundError:
                raise IntegrityError(f"{path} is missing from the volume (stored object "
                                     "deleted)") from None
            actual, expected = os.fstat(fd).st_size, stored_size(entry.size, self._cs)
            if actual != expected:
                os.close(fd)
                change = "truncated" if actual < expected else "extended"
                raise IntegrityError(f"{path} was {change} (stored {actual} bytes, expected "
                                     f"{expected})")
            opened = (fd, FileSealer(path, entry, self._cs))
            self._readers[entry.object_name] = opened
        return opened

    # -- changing -----------------------------------------------------------------------

    def _new_name(self, path: str) -> str:
        """A path about to be made: it must be one the volume can hold (EINVAL otherwise)."""
        relative = self._relative(path)
        try:
            return check_stored_path(relative)
        except InputError:
            raise _fail(errno.EINVAL, path) from None

    def _region(self, path: str) -> RegionKind:
        return self._manifest.regions.kind_of(path)

    def _check_parent(self, relative: str, path: str) -> None:
        parent = relative.rpartition("/")[0]
        if self.is_file(parent):
            raise _fail(errno.ENOTDIR, path)
        if not self.is_dir(parent):
            raise _fail(errno.ENOENT, path)

    def create(self, path: str, mode: int) -> None:
        relative = self._new_name(path)
        if self.is_file(relative) or self.is_dir(relative):
            raise _fail(errno.EEXIST, path)
        self._check_parent(relative, path)
        self._begin(relative, mode & PERMISSION_BITS, base=None)

    def _begin(self, relative: str, mode: int, base: FileEntry | None) -> NewVersion:
        def base_chunk(index: int) -> bytes:
            assert base is not None
            return self._committed_chunk(relative, base, index)

        version = NewVersion(self._folder, relative, self._region(relative), self._cs, mode,
                           base, base_chunk)
        self._pending[relative] = version
        self._changed = True
        return version

    def _writable(self, path: str) -> NewVersion:
        relative = self._relative(path)
        version = self._pending.get(relative)
        if version is not None:
            return version
        entry = self._files.get(relative)
        if entry is None:
            raise _fail(errno.EISDIR if self.is_dir(relative) else errno.ENOENT, path)
        return self._begin(relative, entry.mode, base=entry)

    def write(self, path: str, offset: int, data: bytes | memoryview) -> int:
        """Write ``data`` at ``offset``; nothing keeps a reference to ``data`` afterwards."""
        self._writable(path).write(offset, data)
        return len(data)

    def truncate(self, path: str, length: int) -> None:
        version = self._writable(path)
        if length != version.size:
            version.truncate(length)

    def release(self, path: str) -> None:
        """The last handle on ``path`` closed: seal its new version, if it has one."""
        relative = self._relative(path)
        version = self._pending.pop(relative, None)
        if version is None:
            return
        replaced = self._files.get(relative)
        if replaced is not None:
            self._obsolete.add(replaced.object_name)
        self._files[relative] = version.seal()
        self._obsolete.update(version.superseded)

    def set_mode(self, path: str, mode: int) -> None:
        self._set_meta(path, mode & PERMISSION_BITS, None)

    def set_mtime(self, path: str, mtime_ns: int) -> None:
        self._set_meta(path, None, mtime_ns)

    def _set_meta(self, path: str, mode: int | None, mtime_ns: int | None) -> None:
        relative = self._relative(path)
        version, entry = self._pending.get(relative), self._files.get(relative)
        if version is not None:
            version.mode = version.mode if mode is None else mode
            version.mtime_ns = version.mtime_ns if mtime_ns is None else mtime_ns
        elif entry is not None:
            self._files[relative] = replace(
                entry, mode=entry.mode if mode is None else mode,
                mtime_ns=entry.mtime_ns if mtime_ns is None else mtime_ns)
        elif self.is_dir(relative):
            folder = self._dirs.get(relative) or DirEntry(DEFAULT_DIR_MODE, time.time_ns())
            self._dirs[relative] = DirEntry(folder.mode if mode is None else mode,
                                            folder.mtime_ns if mtime_ns is None else mtime_ns)
        else:
            raise _fail(errno.ENOENT, path)
        self._changed = True

    def mkdir(self, path: str, mode: int) -> None:
        relative = self._new_name(path)
        if self.is_file(relative) or self.is_dir(relative):
            raise _fail(errno.EEXIST, path)
        self._check_parent(relative, path)
        self._dirs[relative] = DirEntry(mode & PERMISSION_BITS, time.time_ns())
        self._changed = True

    def _keep_parent(self, relative: str) -> None:
        """A folder stays when its last entry goes: it becomes an explicit folder."""
        parent = relative.rpartition("/")[0]
        if parent and parent not in self._dirs:
            self._dirs[parent] = DirEntry(DEFAULT_DIR_MODE, time.time_ns())

    def unlink(self, path: str) -> None:
        relative = self._relative(path)
        if not self.is_file(relative):
            raise _fail(errno.EISDIR if self.is_dir(relative) else errno.ENOENT, path)
        self._keep_parent(relative)
        self._drop_file(relative)
        self._changed = True

    def _drop_file(self, relative: str) -> None:
        version = self._pending.pop(relative, None)
        if version is not None:
            version.discard()
            self._obsolete.update(version.superseded)
        entry = self._files.pop(relative, None)
        if entry is not None:
            self._obsolete.add(entry.object_name)

    def rmdir(self, path: str) -> None:
        relative = self._relative(path)
        if relative == "" or not self.is_dir(relative):
            raise _fail(errno.ENOTDIR if self.is_file(relative) else errno.ENOENT, path)
        if any(self._children(relative)):
            raise _fail(errno.ENOTEMPTY, path)
        self._keep_parent(relative)
        self._dirs.pop(relative, None)
        self._changed = True

    def rename(self, old: str, new: str) -> None:
        source, target = self._relative(old), self._new_name(new)
        if source == target:
            return
        if self._region(source) is not self._region(target):
            raise _fail(errno.EXDEV, new)  # another region seals differently: copy instead
        if self.is_file(source):
            if self.is_dir(target):
                raise _fail(errno.EISDIR, new)
            self._check_parent(target, new)
            self._keep_parent(source)
            self._drop_file(target)
            self._move(source, target)
        elif self.is_dir(source):
            if target.startswith(f"{source}/") or self.is_file(target):
                raise _fail(errno.EINVAL if not self.is_file(target) else errno.ENOTDIR, new)
            if self.is_dir(target) and any(self._children(target)):
                raise _fail(errno.ENOTEMPTY, new)
            self._check_parent(target, new)
            for moved in (*self._files, *self._pending, *self._dirs):
                if moved.startswith(f"{source}/"):
                    self._new_name(target + moved[len(source):])
            self._keep_parent(source)
            self._dirs.pop(target, None)
            _move_prefix(self._files, source, target)
            _move_prefix(self._pending, source, target)
            _move_prefix(self._dirs, source, target)
        else:
            raise _fail(errno.ENOENT, old)
        self._changed = True

    def _move(self, source: str, target: str) -> None:
        if source in self._pending:
            self._pending[target] = self._pending.pop(source)
        if source in self._files:
            self._files[target] = self._files.pop(source)

    # -- ending -------------------------------------------------------------------------

    def commit(self) -> VolumeTag:
        """Seal every open version and write the FSPF if anything changed; the new tag."""
        for path in list(self._pending):
            self.release(path)
        self._close_readers()
        if not self._changed:
            return self.tag
        manifest = replace(self._manifest, generation=self._manifest.generation + 1,
                           files=dict(self._files), dirs=dict(self._dirs))
        data, tag = seal_fspf(manifest, self._key)
        self._folder.commit_fspf(data)
        self._folder.remove_objects(self._obsolete)
        self._manifest, self.tag, self._changed = manifest, tag, False
        self._obsolete = set()
        return tag

    def _close_readers(self) -> None:
        for fd, _ in self._readers.values():
            os.close(fd)
        self._readers.clear()
        self._cache.clear()


def _move_prefix(table: dict[str, T], source: str, target: str) -> None:
    for path in [p for p in table if p == source or p.startswith(f"{source}/")]:
        table[target + path[len(source):]] = table.pop(path)

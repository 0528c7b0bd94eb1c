"""Applying container image layers (tar streams) to a root file system folder.

Owns what one layer may put into the folder that becomes the program's ``/``:
regular files, folders, symbolic links and hard links, with OCI whiteouts
applied first. Every layer is read twice, straight from its blob: the first
pass hashes it (blob digest and ``diff_id``) and checks every entry, and
nothing is written unless that pass succeeds; the second pass hashes again
while writing, so a blob that changes in between is still caught. This module
must never create, change or remove anything outside the root folder: it never
resolves a path through a symbolic link (each folder is opened with
``O_NOFOLLOW`` relative to its parent), never follows a link when it creates,
removes or links an entry, and never makes a device, FIFO or socket, a setuid
or setgid file, or a link that leads out of the image root. That folder walk,
:func:`open_folder`, is also the only way the store's staging writes
(:class:`tdapp.builder.store.Staging`).

Decisions, for the reader of an unpacked tree:

- An absolute symbolic link target is allowed: the program runs with the image
  root as ``/``, so ``/bin/sh -> /bin/busybox`` points inside the image. A
  target whose ``..`` components climb above the root (from the link's folder
  for a relative target, from ``/`` for an absolute one) is refused, so no link
  means anything outside the image even to a host tool resolving it lexically.
- A hard link must name a regular file already unpacked (by a lower layer or
  earlier in this one) and becomes ``os.link`` inside the root, which costs no
  space, so hard links cannot multiply the unpacked size. Files are always
  replaced by unlinking and creating anew, never rewritten in place, so a later
  layer never changes what an earlier link points at.
- Modes keep the permission bits; setuid and setgid are dropped (tdapp unpacks
  as whoever runs it, often root, and the store must hold no setuid files);
  folders keep their sticky bit and always get ``rwx`` for the owner, so the
  tree can be read and removed. Owners and timestamps are ignored: everything
  belongs to the unpacking user.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib
import io
import os
import shutil
import stat
import tarfile
import zlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, Protocol, Self, cast

from tdapp.builder.manifest import climbs_above_root
from tdapp.errors import InputError, IntegrityError

MAX_NAME_BYTES = 4096
MAX_ENTRIES = 1_000_000
MAX_UNPACKED_BYTES = 64 * 1024**3
MAX_HEADER_BYTES = 1024 * 1024  # one PAX or GNU long-name header; tarfile holds it in memory
WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_CHUNK = 1024 * 1024
_ONLY = "an image may hold only files, folders and links"
FOLDER_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_DECODE_ERRORS: tuple[type[BaseException], ...] = (
    tarfile.TarError, OSError, EOFError, zlib.error, ValueError)


class Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


@dataclass(frozen=True)
class Layer:
    """One layer to apply: how to read its blob and what it must hash to."""

    index: int  # 1-based, for messages
    open: Callable[[], AbstractContextManager[Readable]]  # the blob, from its start
    digest: str | None  # sha256 of the blob as stored (an OCI descriptor's digest)
    size: int | None  # the blob's size, when a descriptor gives one
    diff_id: str | None  # sha256 of the uncompressed tar (the config's rootfs.diff_ids)

    @property
    def label(self) -> str:
        return f"layer {self.index} ({(self.digest or self.diff_id or 'no digest')[:19]})"


@dataclass
class Budget:
    """What the image has used so far of the entry and unpacked-byte limits."""

    entries: int = 0
    tar_bytes: int = 0


class _HeaderTooLarge(Exception):
    pass


class _TarInfo(tarfile.TarInfo):
    """Refuses an over-long PAX or GNU header before tarfile reads it all into memory."""

    @classmethod
    def frombuf(cls, buf: bytes | bytearray, encoding: str, errors: str) -> Self:
        info = super().frombuf(buf, encoding, errors)
        if info.type in (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE,
                         tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK) \
                and info.size > MAX_HEADER_BYTES:
            raise _HeaderTooLarge(f"has a {info.size}-byte extended header")
        return info


class _Stream(ABC):
    """A forward-only readable stream; gzip and tarfile also want these methods on one."""

    @abstractmethod
    def read(self, size: int = -1, /) -> bytes:
        """Up to ``size`` bytes (all that is left for -1); b"" at the end."""

    def write(self, data: bytes, /) -> int:
        raise io.UnsupportedOperation("read-only")

    def seek(self, offset: int, /) -> int:
        raise io.UnsupportedOperation("not seekable")

    def tell(self) -> int:
        raise io.UnsupportedOperation("not seekable")

    def close(self) -> None:
        return None  # the source belongs to whoever opened it


class _Hashed(_Stream):
    """Reads through ``source``, hashing and counting every byte; refuses more than ``cap``."""

    def __init__(self, source: Readable, cap: int | None = None,
                 too_large: Callable[[], NoReturn] | None = None) -> None:
        self._source, self._cap, self._too_large = source, cap, too_large
        self.sha256 = hashlib.sha256()
        self.size = 0

    def read(self, size: int = -1, /) -> bytes:
        data = self._source.read(size)
        self.sha256.update(data)
        self.size += len(data)
        if self._cap is not None and self.size > self._cap and self._too_large:
            self._too_large()
        return data

    def drain(self) -> None:
        while self.read(_CHUNK):
            pass

    def digest(self) -> str:
        return "sha256:" + self.sha256.hexdigest()


class _Prefixed(_Stream):
    """``head`` (already read from ``source``) and then the rest of ``source``."""

    def __init__(self, head: bytes, source: Readable) -> None:
        self._head, self._source = head, source

    def read(self, size: int = -1, /) -> bytes:
        if not self._head:
            return self._source.read(size)
        if size < 0:
            data, self._head = self._head + self._source.read(), b""
        else:
            data, self._head = self._head[:size], self._head[size:]
        return data


@dataclass(frozen=True)
class _Entry:
    name: str  # as in the tar, for messages
    parts: tuple[str, ...]
    kind: str  # file, dir, symlink, hardlink, whiteout, opaque, skip
    mode: int = 0
    target: str = ""
    target_parts: tuple[str, ...] = ()


def apply_layer(root: Root, layer: Layer, budget: Budget) -> None:
    """Verify ``layer`` completely, then apply its whiteouts, then its entries, to ``root``."""
    whiteouts: list[_Entry] = []

    def check(tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        budget.entries += 1
        if budget.entries > MAX_ENTRIES:
            raise IntegrityError(f"{layer.label}: the image has more than {MAX_ENTRIES} "
                                 "entries; refused")
        entry = _check_entry(member, layer.label)
        if entry.kind in ("whiteout", "opaque"):
            whiteouts.append(entry)

    used = _read_pass(layer, budget.tar_bytes, check, verifying=True)
    budget.tar_bytes += used
    for entry in whiteouts:
        root.whiteout(entry, layer.label)

    def write(tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        entry = _check_entry(member, layer.label)
        if entry.kind == "file":
            content = tar.extractfile(member)
            assert content is not None  # a regular file
            root.make_file(entry, content, layer.label)
        elif entry.kind == "dir":
            root.make_dir(entry, layer.label)
        elif entry.kind == "symlink":
            root.make_symlink(entry, layer.label)
        elif entry.kind == "hardlink":
            root.make_hardlink(entry, layer.label)

    _read_pass(layer, budget.tar_bytes - used, write, verifying=False)


def _read_pass(layer: Layer, used: int, visit: Callable[[tarfile.TarFile, tarfile.TarInfo], None],
               verifying: bool) -> int:
    """Stream the layer's tar through ``visit``; check its hashes; the tar's size."""
    label = layer.label

    def too_large() -> NoReturn:
        raise IntegrityError(f"{label}: the image unpacks to more than "
                             f"{MAX_UNPACKED_BYTES} bytes; refused")

    compression = "uncompressed"
    try:
        with layer.open() as source:
            blob = _Hashed(source)
            try:
                head = blob.read(4)
                compression = _compression(head, label)
                tar_bytes = _Hashed(_decompressed(compression, _Prefixed(head, blob)),
                                    MAX_UNPACKED_BYTES - used, too_large)
                if head:  # an empty blob is an empty layer
                    with tarfile.open(fileobj=tar_bytes, mode="r|", tarinfo=_TarInfo) as tar:
                        while (member := tar.next()) is not None:
                            visit(tar, member)
                            cast(Any, tar).members.clear()  # else tarfile keeps every member
                tar_bytes.drain()  # the end-of-archive padding is part of the diff_id
                blob.drain()
            except _HeaderTooLarge as error:
                raise IntegrityError(f"{label}: an entry {error}; refused") from None
            except _DECODE_ERRORS + _zstd_errors() as error:
                try:
                    blob.drain()
                except _DECODE_ERRORS as reading:
                    raise InputError(f"{label}: cannot read the blob: "
                                     f"{_one_line(reading)}") from None
                _check_hashes(layer, blob, None, verifying)
                if compression == "uncompressed":
                    _check_hashes(layer, blob, blob, verifying)
                raise InputError(f"{label} is not a valid {compression} tar: "
                                 f"{_one_line(error)}") from None
    except OSError as error:
        raise InputError(f"{label}: cannot read the blob: {error.strerror or error}") from None
    _check_hashes(layer, blob, tar_bytes, verifying)
    return tar_bytes.size


def _check_hashes(layer: Layer, blob: _Hashed, tar_bytes: _Hashed | None, verifying: bool) -> None:
    how = "" if verifying else " (it changed while it was being unpacked)"
    if layer.digest is not None and blob.digest() != layer.digest:
        raise IntegrityError(f"{layer.label}: blob does not match its digest {layer.digest} "
                             f"(it hashes to {blob.digest()}){how}")
    if layer.size is not None and blob.size != layer.size:
        raise IntegrityError(f"{layer.label}: blob {layer.digest} is {blob.size} bytes, its "
                             f"descriptor says {layer.size}{how}")
    if tar_bytes is not None and layer.diff_id is not None \
            and tar_bytes.digest() != layer.diff_id:
        raise IntegrityError(f"{layer.label}: its uncompressed tar does not match diff_id "
                             f"{layer.diff_id} from the image config (it hashes to "
                             f"{tar_bytes.digest()}){how}")


def _compression(head: bytes, label: str) -> str:
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if head.startswith(ZSTD_MAGIC):
        try:
            importlib.import_module("zstandard")
        except ImportError:
            raise InputError(f"{label} is zstd-compressed, which needs the Python package "
                             "zstandard (not installed); not supported") from None
        return "zstd"
    return "uncompressed"


def _decompressed(compression: str, blob: _Prefixed) -> Readable:
    if compression == "gzip":
        return gzip.GzipFile(fileobj=blob, mode="rb")
    if compression == "zstd":
        zstandard: Any = importlib.import_module("zstandard")
        reader: Readable = zstandard.ZstdDecompressor().stream_reader(
            blob, read_across_frames=True)
        return reader
    return blob


def _zstd_errors() -> tuple[type[BaseException], ...]:
    try:
        zstandard: Any = importlib.import_module("zstandard")
    except ImportError:
        return ()
    return (zstandard.ZstdError,)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _path_parts(name: str, refuse: Callable[[str], NoReturn]) -> tuple[str, ...]:
    if "\x00" in name:
        refuse("holds a NUL character")
    if len(os.fsencode(name)) > MAX_NAME_BYTES:
        refuse(f"is longer than {MAX_NAME_BYTES} bytes")
    while name.startswith("./"):
        name = name[2:]
    if name.startswith("/"):
        refuse("is an absolute path")
    parts = tuple(part for part in name.split("/") if part not in ("", "."))
    if ".." in parts:
        refuse("has a '..' component (path traversal)")
    return parts


def _check_entry(member: tarfile.TarInfo, label: str) -> _Entry:
    name = member.name

    def refuse(reason: str) -> NoReturn:
        raise IntegrityError(f"{label}: entry {name!r} {reason}; refused")

    parts = _path_parts(name, refuse)
    if any(part.startswith(WHITEOUT) for part in parts[:-1]):
        refuse("lies inside a whiteout")
    if parts and parts[-1].startswith(WHITEOUT):
        if parts[-1] == OPAQUE:
            return _Entry(name, parts, "opaque")
        if parts[-1].startswith(WHITEOUT + WHITEOUT):
            return _Entry(name, parts, "skip")  # other AUFS metadata: never unpacked
        if parts[-1][len(WHITEOUT):] in ("", ".", ".."):
            refuse("is a whiteout of no valid name")
        return _Entry(name, parts, "whiteout")
    if member.ischr() or member.isblk():
        refuse(f"is a device node; {_ONLY}")
    if member.isfifo():
        refuse(f"is a FIFO; {_ONLY}")
    if not (member.isreg() or member.isdir() or member.issym() or member.islnk()):
        refuse(f"has the unsupported tar type {member.type!r}; {_ONLY}")
    if not parts:
        if member.isdir():
            return _Entry(name, parts, "skip")  # the root folder belongs to the caller
        refuse("names the image root")
    if member.isdir():
        return _Entry(name, parts, "dir", stat.S_IMODE(member.mode) & 0o1777 | 0o700)
    if member.isreg():
        return _Entry(name, parts, "file", stat.S_IMODE(member.mode) & 0o777)
    target = member.linkname
    if not target or "\x00" in target or len(os.fsencode(target)) > MAX_NAME_BYTES:
        refuse("has an empty, NUL-holding or over-long link target")
    if member.issym():
        if climbs_above_root(len(parts) - 1, target):
            refuse(f"is a symbolic link to {target!r}, which leads out of the image root")
        return _Entry(name, parts, "symlink", target=target)

    def refuse_target(reason: str) -> NoReturn:
        refuse(f"is a hard link to {target!r}, which {reason}")

    target_parts = _path_parts(target, refuse_target)
    if not target_parts:
        refuse_target("is the image root")
    return _Entry(name, parts, "hardlink", target=target, target_parts=target_parts)


def open_folder(root_fd: int, parts: tuple[str, ...], create: bool,
                refuse: Callable[[str], NoReturn], doing: str) -> int | None:
    """The folder ``parts`` below ``root_fd``, opened; never reached through a symbolic link.

    Each component is opened ``O_NOFOLLOW | O_DIRECTORY`` relative to its parent,
    so nothing outside ``root_fd`` is ever reached. A missing folder is made
    (mode 0755) with ``create`` and gives None without it; a symbolic link on the
    way, or a non-folder with ``create``, is passed to ``refuse``. The caller
    closes the returned descriptor.
    """
    fd = os.dup(root_fd)
    try:
        for depth, part in enumerate(parts):
            try:
                info = os.lstat(part, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    os.close(fd)
                    return None
                # An archive need not list the folders it writes into.
                os.mkdir(part, 0o700, dir_fd=fd)
                info = os.lstat(part, dir_fd=fd)
                implied = True
            else:
                implied = False
            where = "/".join(parts[:depth + 1])
            if stat.S_ISLNK(info.st_mode):
                refuse(f"would be {doing} through the symbolic link {where!r}")
            if not stat.S_ISDIR(info.st_mode):
                if not create:
                    os.close(fd)
                    return None
                refuse(f"would be {doing} inside {where!r}, which is not a folder")
            child = os.open(part, FOLDER_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = child
            if implied:
                os.fchmod(fd, 0o755)
        return fd
    except BaseException:
        os.close(fd)
        raise


class Root:
    """The root folder being filled; every change goes through a folder opened O_NOFOLLOW."""

    def __init__(self, path: Path) -> None:
        try:
            self._fd = os.open(path, FOLDER_FLAGS)
        except OSError as error:
            raise InputError(f"cannot open {path} as the root folder (an existing folder, not "
                             f"a symbolic link): {error.strerror}") from None
        try:
            names = os.listdir(self._fd)
        except OSError as error:
            os.close(self._fd)
            raise InputError(f"cannot list {path}: {error.strerror}") from None
        if names:
            os.close(self._fd)
            raise InputError(f"{path} is not empty; an image is unpacked into an empty folder")

    def close(self) -> None:
        os.close(self._fd)

    @contextmanager
    def _os(self, entry: _Entry, label: str) -> Iterator[None]:
        try:
            yield
        except OSError as error:
            raise InputError(f"{label}: cannot unpack entry {entry.name!r}: "
                             f"{error.strerror or error}") from None

    def _refuser(self, entry: _Entry, label: str) -> Callable[[str], NoReturn]:
        def refuse(reason: str) -> NoReturn:
            raise IntegrityError(f"{label}: entry {entry.name!r} {reason}; refused")
        return refuse

    def _parent(self, entry: _Entry, label: str) -> int:
        fd = open_folder(self._fd, entry.parts[:-1], True, self._refuser(entry, label),
                         "written")
        assert fd is not None  # created when missing
        return fd

    @staticmethod
    def _clear(parent: int, name: str, keep_dir: bool = False) -> bool:
        """Remove ``name`` (a whole tree for a folder); True if a folder was kept."""
        try:
            info = os.lstat(name, dir_fd=parent)
        except FileNotFoundError:
            return False
        if stat.S_ISDIR(info.st_mode):
            if keep_dir:
                return True
            shutil.rmtree(name, dir_fd=parent)  # fd-based: never follows a link
        else:
            os.unlink(name, dir_fd=parent)
        return False

    def whiteout(self, entry: _Entry, label: str) -> None:
        with self._os(entry, label):
            folder = open_folder(self._fd, entry.parts[:-1], False,
                                 self._refuser(entry, label), "removed")
            if folder is None:
                return  # nothing below to hide
            try:
                if entry.kind == "opaque":
                    for name in os.listdir(folder):
                        self._clear(folder, name)
                else:
                    self._clear(folder, entry.parts[-1][len(WHITEOUT):])
            finally:
                os.close(folder)

    def make_dir(self, entry: _Entry, label: str) -> None:
        with self._os(entry, label):
            parent = self._parent(entry, label)
            try:
                if not self._clear(parent, entry.parts[-1], keep_dir=True):
                    os.mkdir(entry.parts[-1], 0o700, dir_fd=parent)
                fd = os.open(entry.parts[-1], FOLDER_FLAGS, dir_fd=parent)
                try:
                    os.fchmod(fd, entry.mode)
                finally:
                    os.close(fd)
            finally:
                os.close(parent)

    def make_file(self, entry: _Entry, content: Readable, label: str) -> None:
        with self._os(entry, label):
            parent = self._parent(entry, label)
            try:
                self._clear(parent, entry.parts[-1])
                fd = os.open(entry.parts[-1], os.O_WRONLY | os.O_CREAT | os.O_EXCL
                             | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=parent)
            finally:
                os.close(parent)
        try:
            while chunk := content.read(_CHUNK):  # decoding errors go to the caller
                with self._os(entry, label):
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(fd, view):]
            with self._os(entry, label):
                os.fchmod(fd, entry.mode)
        finally:
            os.close(fd)

    def make_symlink(self, entry: _Entry, label: str) -> None:
        with self._os(entry, label):
            parent = self._parent(entry, label)
            try:
                self._clear(parent, entry.parts[-1])
                os.symlink(entry.target, entry.parts[-1], dir_fd=parent)
            finally:
                os.close(parent)

    def make_hardlink(self, entry: _Entry, label: str) -> None:
        refuse = self._refuser(entry, label)
        missing = f"is a hard link to {entry.target!r}, which is not a regular file unpacked " \
                  "before it"
        with self._os(entry, label):
            source = open_folder(self._fd, entry.target_parts[:-1], False, refuse, "linked")
            if source is None:
                refuse(missing)
            try:
                try:
                    info = os.lstat(entry.target_parts[-1], dir_fd=source)
                except FileNotFoundError:
                    refuse(missing)
                if not stat.S_ISREG(info.st_mode):
                    refuse(missing)
                if entry.target_parts == entry.parts:
                    return  # a link to itself changes nothing
                parent = self._parent(entry, label)
                try:
                    self._clear(parent, entry.parts[-1])
                    os.link(entry.target_parts[-1], entry.parts[-1], src_dir_fd=source,
                            dst_dir_fd=parent, follow_symlinks=False)
                finally:
                    os.close(parent)
            finally:
                os.close(source)

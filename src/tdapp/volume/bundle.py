"""Bundles: several encrypted volume folders in one zip file, for the transfer service.

A bundle holds ``<volume name>/volume.fspf``, ``<volume name>/objects/…``
and so on. Its content is already sealed, so the zip adds no protection and
needs none. A bundle comes from anyone, so unpacking trusts nothing in it:

- only the volumes the caller asks for are written, never an extra folder;
- every member is checked before anything is written: a safe name, no link,
  no zip encryption, a known compression method, at most
  :attr:`BundleLimits.ratio` times larger than it is stored (sealed content
  does not compress), at most :attr:`BundleLimits.members` members (counted
  in the central directory itself, before :mod:`zipfile` parses it), and at
  most :attr:`BundleLimits.total_bytes` for the volumes that are written;
- a member is written only up to the size it declares.

Every refusal is one :class:`~tdapp.errors.InputError` line naming the member
and the limit. This module must never write outside the target folder,
create a link, or let :mod:`zipfile`'s own exceptions escape.
"""

from __future__ import annotations

import os
import stat
import struct
import zipfile
import zlib
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from tdapp.errors import InputError
from tdapp.volume.paths import check_stored_path

MAX_BUNDLE_BYTES = 64 * 1024**3
MAX_MEMBERS = 200_000
MAX_RATIO = 100
RATIO_FLOOR = 1024 * 1024
"""Members smaller than this expand harmlessly, whatever their ratio."""

_ACCEPTED_METHODS = frozenset({zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED})
_ENCRYPTED_FLAG = 0x1
_CHUNK = 1024 * 1024
_EOCD = struct.Struct("<4s4H2LH")
_ZIP64_LOCATOR = struct.Struct("<4sLQL")
_ZIP64_EOCD = struct.Struct("<4sQ2H2L4Q")
_CENTRAL_HEADER = struct.Struct("<4s24xHHH12x")  # signature, then name/extra/comment lengths


@dataclass(frozen=True)
class BundleLimits:
    """How far a bundle may expand; the defaults suit any honest bundle."""

    total_bytes: int = MAX_BUNDLE_BYTES
    """Uncompressed bytes of the members that are written."""
    ratio: int = MAX_RATIO
    """Uncompressed over stored size, for each member of at least RATIO_FLOOR bytes."""
    members: int = MAX_MEMBERS


DEFAULT_LIMITS = BundleLimits()


def pack(volumes: dict[str, Path], target: Path) -> None:
    """Zip each volume folder under its name (stored, not compressed: it is ciphertext)."""
    temporary = target.with_name(f".{target.name}.{os.urandom(6).hex()}.tmp")
    with zipfile.ZipFile(temporary, "w", compression=zipfile.ZIP_STORED,
                         allowZip64=True) as archive:
        for name, folder in sorted(volumes.items()):
            for current, dirnames, filenames in os.walk(folder):
                dirnames.sort()
                for filename in sorted(filenames):
                    path = Path(current) / filename
                    archive.write(path, f"{name}/{path.relative_to(folder).as_posix()}")
    temporary.replace(target)


def unpack(source: Path, target: Path, wanted: Collection[str] | None = None, *,
           limits: BundleLimits = DEFAULT_LIMITS) -> dict[str, Path]:
    """Unzip the volumes named in ``wanted`` (all when None) into ``target``.

    Returns volume name -> folder for those of them the bundle holds.
    """
    try:
        with source.open("rb") as handle:
            _check_member_count(handle, source, limits.members)
            handle.seek(0)
            with zipfile.ZipFile(handle) as archive:  # the same file that was counted
                members = _checked_members(archive.infolist(), source, wanted, limits)
                return _extract(archive, members, source, target)
    except OSError as error:
        if isinstance(error, FileNotFoundError) and error.filename == str(source):
            raise InputError(f"{source} does not exist") from None
        raise InputError(f"cannot unpack {source}: {error.strerror or error}") from None
    # zipfile raises these for truncated, inconsistent or unsupported archives; RuntimeError
    # is its answer to an encrypted member, which _checked_members already refuses.
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, ValueError,
            RuntimeError, struct.error, OverflowError) as error:
        raise InputError(f"{source} is not a valid volume bundle: {error}") from None


def _check_member_count(handle: BinaryIO, source: Path, limit: int) -> None:
    """Count the central directory's records without holding them, before zipfile does."""
    offset, size = _central_directory(handle, source)
    handle.seek(offset)
    count, seen = 0, 0
    while seen < size:
        record = handle.read(_CENTRAL_HEADER.size)
        if len(record) < _CENTRAL_HEADER.size:
            raise InputError(f"{source} is not a valid volume bundle: its central directory "
                             "is cut short")
        signature, name_length, extra_length, comment_length = _CENTRAL_HEADER.unpack(record)
        if signature != b"PK\x01\x02":
            raise InputError(f"{source} is not a valid volume bundle: bad central directory")
        count += 1
        if count > limit:
            raise InputError(f"{source} holds more than {limit} members (the limit for a "
                             "bundle)")
        skip = name_length + extra_length + comment_length
        handle.seek(skip, os.SEEK_CUR)
        seen += _CENTRAL_HEADER.size + skip


def _central_directory(handle: BinaryIO, source: Path) -> tuple[int, int]:
    """(offset, size) of the central directory, from the end records (zip64 or not)."""
    end = handle.seek(0, os.SEEK_END)
    tail_start = max(0, end - _EOCD.size - 0xFFFF)
    handle.seek(tail_start)
    tail = handle.read()
    position = tail.rfind(b"PK\x05\x06")
    if position < 0 or len(tail) - position < _EOCD.size:
        raise InputError(f"{source} is not a volume bundle (zip): no end of central directory")
    _, _, _, _, _, size, offset, _ = _EOCD.unpack_from(tail, position)
    record_at = tail_start + position
    locator_at = record_at - _ZIP64_LOCATOR.size
    if locator_at >= 0:
        handle.seek(locator_at)
        locator = handle.read(_ZIP64_LOCATOR.size)
        if locator[:4] == b"PK\x06\x07":  # a zip64 end record holds the real values
            record_at = _ZIP64_LOCATOR.unpack(locator)[2]
            handle.seek(record_at)
            record = handle.read(_ZIP64_EOCD.size)
            if len(record) < _ZIP64_EOCD.size or record[:4] != b"PK\x06\x06":
                raise InputError(f"{source} is not a valid volume bundle: bad zip64 end record")
            size, offset = _ZIP64_EOCD.unpack(record)[-2:]
    if offset + size != record_at:
        # Data before the archive or a directory that is not where the end record says.
        raise InputError(f"{source} is not a valid volume bundle: its central directory is "
                         "not where its end record says")
    return offset, size


def _checked_members(members: list[zipfile.ZipInfo], source: Path,
                     wanted: Collection[str] | None,
                     limits: BundleLimits) -> list[zipfile.ZipInfo]:
    """Every member checked; returns the files to write, before any is written."""
    selected: list[zipfile.ZipInfo] = []
    names: set[str] = set()
    folders: set[str] = set()
    total = 0
    for member in members:
        name = member.filename.rstrip("/") if member.is_dir() else member.filename
        try:
            check_stored_path(name)
        except InputError:
            raise InputError(f"{source} holds an unsafe name {member.filename!r}") from None
        if member.flag_bits & _ENCRYPTED_FLAG:
            raise InputError(f"{source}: member {name!r} is zip-encrypted; a bundle holds "
                             "sealed volumes and is never encrypted as a zip")
        if member.compress_type not in _ACCEPTED_METHODS:
            raise InputError(f"{source}: member {name!r} uses compression method "
                             f"{member.compress_type}; only stored and deflated are accepted")
        if stat.S_ISLNK(member.external_attr >> 16):
            raise InputError(f"{source} holds a symbolic link {name!r}")
        if (member.file_size >= RATIO_FLOOR
                and member.file_size > limits.ratio * max(member.compress_size, 1)):
            raise InputError(
                f"{source}: member {name!r} expands from {member.compress_size} to "
                f"{member.file_size} bytes, more than {limits.ratio} times (the limit); "
                "sealed volumes do not compress")
        if name in names:
            raise InputError(f"{source} names {name!r} twice")
        names.add(name)
        parts = name.split("/")
        folders.update("/".join(parts[:depth]) for depth in range(1, len(parts)))
        if member.is_dir() or (wanted is not None and parts[0] not in wanted):
            continue
        total += member.file_size
        if total > limits.total_bytes:
            raise InputError(f"{source}: the volumes to unpack expand to more than "
                             f"{limits.total_bytes} bytes (the limit), passed at member "
                             f"{name!r}")
        selected.append(member)
    clash = sorted(member.filename for member in selected if member.filename in folders)
    if clash:
        raise InputError(f"{source} holds {clash[0]!r} both as a file and as a folder")
    return selected


def _extract(archive: zipfile.ZipFile, members: list[zipfile.ZipInfo], source: Path,
             target: Path) -> dict[str, Path]:
    volumes: dict[str, Path] = {}
    for member in members:
        volume = member.filename.split("/", 1)[0]
        destination = target / member.filename
        destination.parent.mkdir(parents=True, exist_ok=True)
        written = 0
        with archive.open(member) as reader, destination.open("xb") as writer:
            while chunk := reader.read(_CHUNK):
                written += len(chunk)
                if written > member.file_size:
                    raise InputError(f"{source}: member {member.filename!r} holds more than "
                                     f"the {member.file_size} bytes it declares")
                writer.write(chunk)
        volumes[volume] = target / volume
    return volumes


def find_bundle(path: Path) -> Path:
    """A zip file, or a folder holding exactly one (as the seed's ZIP folder does)."""
    if path.is_file():
        return path
    if path.is_dir():
        zips = sorted(p for p in path.iterdir() if p.suffix == ".zip" and p.is_file())
        if len(zips) == 1:
            return zips[0]
        raise InputError(f"{path} holds {len(zips)} zip files; expected exactly one "
                         "(or give the file itself)")
    raise InputError(f"{path} does not exist")

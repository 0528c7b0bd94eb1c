"""The measurement (tdapp's MrEnclave): one SHA-256 over an image's canonical description.

Owns the canonical bytes, exactly as docs/measurement.md defines them, and the
reading of an image's files from disk to feed them. :func:`measure_image`
recomputes everything from what is on disk and never reads a recorded
measurement or file hash. Nothing here may let the value depend on timestamps,
owners, the order a folder lists its entries in, or where the image lives.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterable
from pathlib import Path

from tdapp.builder.manifest import Config, FileRecord, Manifest, check_image_path
from tdapp.errors import InputError, IntegrityError

MEASUREMENT_FORMAT = 1
MAGIC = "tdapp-image-measurement"
MANIFEST_FILE = "manifest.json"
ROOT_FOLDER = "rootfs"
_READ_SIZE = 1024 * 1024


def _u64(value: int) -> bytes:
    return value.to_bytes(8, "big")


def _text(value: str) -> bytes:
    encoded = value.encode("utf-8")
    return _u64(len(encoded)) + encoded


def canonical_bytes(config: Config, files: Iterable[FileRecord]) -> bytes:
    """The exact bytes the measurement hashes (docs/measurement.md, "Canonical bytes")."""
    parts = [_text(MAGIC), _u64(MEASUREMENT_FORMAT), _text(config.mode),
             _u64(config.heap), _u64(config.stack), _u64(len(config.entrypoint))]
    parts.extend(_text(argument) for argument in config.entrypoint)
    host_paths = sorted(set(config.host_paths))
    parts.append(_u64(len(host_paths)))
    parts.extend(_text(path) for path in host_paths)
    # Python orders str by code point, which is the order of their UTF-8 bytes.
    records = sorted(files, key=lambda record: record.path)
    parts.append(_u64(len(records)))
    for record in records:
        parts += [_text(record.path), _u64(record.mode), _u64(record.size),
                  bytes.fromhex(record.sha256)]
    return b"".join(parts)


def measurement(config: Config, files: Iterable[FileRecord]) -> str:
    """64 lowercase hex: SHA-256 of :func:`canonical_bytes`."""
    return hashlib.sha256(canonical_bytes(config, files)).hexdigest()


def hash_file(path: str) -> tuple[int, str]:
    """Size and SHA-256 of a regular file, read without following a symlink."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as error:
        raise IntegrityError(f"cannot read {path}: {error.strerror}") from None
    digest = hashlib.sha256()
    size = 0
    try:
        while chunk := os.read(fd, _READ_SIZE):
            digest.update(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    return size, digest.hexdigest()


def scan_files(root: Path) -> list[FileRecord]:
    """Every regular file under ``root`` with its mode, size and hash, sorted by path.

    Anything else (a symlink, a device, a socket) is an error: an image holds
    regular files only, so nothing in it can point the program elsewhere.
    Folders are not recorded; they exist only as the parents of files.
    """
    if not root.is_dir() or root.is_symlink():
        raise IntegrityError(f"{root} is missing or not a folder")
    records: list[FileRecord] = []
    _scan(str(root), "", records)
    records.sort(key=lambda record: record.path)
    return records


def _scan(directory: str, prefix: str, records: list[FileRecord]) -> None:
    try:
        with os.scandir(directory) as iterator:
            children = sorted(iterator, key=lambda entry: entry.name)
    except OSError as error:
        raise IntegrityError(f"cannot read {directory}: {error.strerror}") from None
    for child in children:
        relative = check_image_path(prefix + child.name, IntegrityError)
        info = child.stat(follow_symlinks=False)
        if stat.S_ISDIR(info.st_mode):
            _scan(child.path, relative + "/", records)
        elif stat.S_ISREG(info.st_mode):
            size, digest = hash_file(child.path)
            records.append(FileRecord(relative, stat.S_IMODE(info.st_mode), size, digest))
        else:
            kind = "a symbolic link" if stat.S_ISLNK(info.st_mode) else "not a regular file"
            raise IntegrityError(f"{child.path} is {kind}; an image holds only regular files")


def read_manifest(image_dir: Path) -> Manifest:
    """The checked manifest of an image folder."""
    path = image_dir / MANIFEST_FILE
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise InputError(f"{image_dir} is not a tdapp image (no {MANIFEST_FILE})") from None
    except OSError as error:
        raise IntegrityError(f"cannot read {path}: {error.strerror}") from None
    with os.fdopen(fd, "rb") as handle:
        data = handle.read()
    return Manifest.from_json(data, str(image_dir))


def measure_image(path: Path | str) -> str:
    """Recompute an image's measurement from its files on disk.

    The settings (entrypoint, limits, mode, host paths) come from its
    manifest.json, which they are measured from; the files come from
    ``rootfs/`` as they are now. The manifest's recorded measurement and file
    hashes are not used: a changed, added or removed file, or an edited
    setting, gives a different value.
    """
    image_dir = Path(path)
    manifest = read_manifest(image_dir)
    return measurement(manifest.config, scan_files(image_dir / ROOT_FOLDER))

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
from dataclasses import dataclass
from pathlib import Path

from tdapp.builder.manifest import (
    Config,
    DirRecord,
    FileRecord,
    LinkRecord,
    Manifest,
    check_image_path,
    check_link_target,
)
from tdapp.errors import InputError, IntegrityError

MEASUREMENT_FORMAT = 2
MAGIC = "tdapp-image-measurement"
MANIFEST_FILE = "manifest.json"
ROOT_FOLDER = "rootfs"
_READ_SIZE = 1024 * 1024


def _u64(value: int) -> bytes:
    return value.to_bytes(8, "big")


def _text(value: str) -> bytes:
    encoded = value.encode("utf-8")
    return _u64(len(encoded)) + encoded


@dataclass(frozen=True)
class Tree:
    """Everything under an image's root: files, folders and symbolic links, sorted."""

    files: tuple[FileRecord, ...]
    dirs: tuple[DirRecord, ...] = ()
    links: tuple[LinkRecord, ...] = ()

    @classmethod
    def of(cls, manifest: Manifest) -> Tree:
        return cls(manifest.files, manifest.dirs, manifest.links)


def canonical_bytes(config: Config, tree: Tree) -> bytes:
    """The exact bytes the measurement hashes (docs/measurement.md, "Canonical bytes")."""
    parts = [_text(MAGIC), _u64(MEASUREMENT_FORMAT), _text(config.mode),
             _u64(config.heap), _u64(config.stack), _u64(len(config.entrypoint))]
    parts.extend(_text(argument) for argument in config.entrypoint)
    host_paths = sorted(set(config.host_paths))
    parts.append(_u64(len(host_paths)))
    parts.extend(_text(path) for path in host_paths)
    parts.append(_text(config.user))
    # Python orders str by code point, which is the order of their UTF-8 bytes.
    files = sorted(tree.files, key=lambda record: record.path)
    parts.append(_u64(len(files)))
    for record in files:
        parts += [_text(record.path), _u64(record.mode), _u64(record.size),
                  bytes.fromhex(record.sha256)]
    dirs = sorted(tree.dirs, key=lambda record: record.path)
    parts.append(_u64(len(dirs)))
    for folder in dirs:
        parts += [_text(folder.path), _u64(folder.mode)]
    links = sorted(tree.links, key=lambda record: record.path)
    parts.append(_u64(len(links)))
    for link in links:
        parts += [_text(link.path), _text(link.target)]
    return b"".join(parts)


def measurement(config: Config, tree: Tree) -> str:
    """64 lowercase hex: SHA-256 of :func:`canonical_bytes`."""
    return hashlib.sha256(canonical_bytes(config, tree)).hexdigest()


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


def scan_tree(root: Path) -> Tree:
    """Every file (mode, size, hash), folder (mode) and symbolic link (target) under ``root``.

    Nothing is followed: a link is recorded as its target text, and must not lead
    out of the root. Anything else (a device, a socket, a FIFO) is an error.
    """
    if not root.is_dir() or root.is_symlink():
        raise IntegrityError(f"{root} is missing or not a folder")
    files: list[FileRecord] = []
    dirs: list[DirRecord] = []
    links: list[LinkRecord] = []
    _scan(str(root), "", files, dirs, links)
    return Tree(tuple(sorted(files, key=lambda record: record.path)),
                tuple(sorted(dirs, key=lambda record: record.path)),
                tuple(sorted(links, key=lambda record: record.path)))


def _scan(directory: str, prefix: str, files: list[FileRecord], dirs: list[DirRecord],
          links: list[LinkRecord]) -> None:
    try:
        with os.scandir(directory) as iterator:
            children = sorted(iterator, key=lambda entry: entry.name)
    except OSError as error:
        raise IntegrityError(f"cannot read {directory}: {error.strerror}") from None
    for child in children:
        relative = check_image_path(prefix + child.name, IntegrityError)
        info = child.stat(follow_symlinks=False)
        if stat.S_ISDIR(info.st_mode):
            dirs.append(DirRecord(relative, stat.S_IMODE(info.st_mode)))
            _scan(child.path, relative + "/", files, dirs, links)
        elif stat.S_ISREG(info.st_mode):
            size, digest = hash_file(child.path)
            files.append(FileRecord(relative, stat.S_IMODE(info.st_mode), size, digest))
        elif stat.S_ISLNK(info.st_mode):
            target = os.readlink(child.path)
            links.append(LinkRecord(relative, check_link_target(relative, target,
                                                                IntegrityError)))
        else:
            raise IntegrityError(f"{child.path} is not a regular file, folder or symbolic "
                                 "link; an image holds nothing else")


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
    return measurement(manifest.config, scan_tree(image_dir / ROOT_FOLDER))

"""Bundles: several encrypted volume folders in one zip file, for the transfer service.

A bundle holds ``<volume name>/volume.fspf``, ``<volume name>/objects/…``
and so on. Its content is already sealed, so the zip adds no protection and
needs none; unpacking must still never write outside the target folder, nor
create links, nor expand without bound.
"""

from __future__ import annotations

import os
import stat
import zipfile
import zlib
from pathlib import Path

from tdapp.errors import InputError
from tdapp.volume.paths import check_stored_path

MAX_BUNDLE_BYTES = 64 * 1024**3


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


def unpack(source: Path, target: Path) -> dict[str, Path]:
    """Unzip a bundle into ``target``; returns volume name -> folder."""
    try:
        return _unpack(source, target)
    # zipfile raises NotImplementedError for a compression method it does not know.
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, ValueError) as error:
        raise InputError(f"{source} is not a valid volume bundle: {error}") from None
    except FileExistsError as error:
        raise InputError(f"{source} names {error.filename} twice") from None


def _unpack(source: Path, target: Path) -> dict[str, Path]:
    try:
        archive = zipfile.ZipFile(source)
    except (OSError, zipfile.BadZipFile) as error:
        raise InputError(f"{source} is not a volume bundle (zip): {error}") from None
    with archive:
        members = archive.infolist()
        if sum(member.file_size for member in members) > MAX_BUNDLE_BYTES:
            raise InputError(f"{source} expands to more than {MAX_BUNDLE_BYTES} bytes")
        volumes: dict[str, Path] = {}
        for member in members:
            if member.is_dir():
                continue
            name = member.filename
            try:
                check_stored_path(name)
            except InputError:
                raise InputError(f"{source} holds an unsafe name {name!r}") from None
            if stat.S_ISLNK(member.external_attr >> 16):
                raise InputError(f"{source} holds a symbolic link {name!r}")
            volume = name.split("/", 1)[0]
            destination = target / name
            destination.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(member) as reader, destination.open("xb") as writer:
                while chunk := reader.read(1024 * 1024):
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

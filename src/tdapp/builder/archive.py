"""``tdapp image export|import``: an image as a deterministic tar archive.

Owns the archive form (docs/measurement.md, "Archives"): ``manifest.json`` then
``rootfs/<path>`` for every file, sorted, each with mtime 0, owner 0:0, no
user or group names, so one image always gives the same bytes. Import reads
the archive member by member into a staging folder of the store and never
uses tarfile's own extraction. It must never create anything outside that
folder, accept a link, a device or any non-regular file, or publish an image
whose files do not give its recorded measurement.
"""

from __future__ import annotations

import os
import tarfile
from dataclasses import replace
from pathlib import Path
from typing import IO

from tdapp.builder.manifest import Manifest, check_image_path, check_name
from tdapp.builder.measure import MANIFEST_FILE, ROOT_FOLDER, measurement, scan_files
from tdapp.builder.store import Staging, image_store_dir, load_image, locked
from tdapp.errors import ConflictError, InputError, IntegrityError, TdappError

MAX_MANIFEST_SIZE = 64 * 1024 * 1024
_COPY_SIZE = 1024 * 1024


def _member(name: str, size: int, mode: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.type = size, mode, tarfile.REGTYPE
    info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
    return info


def export_image(name: str, target: Path) -> str:
    """Write image ``name`` (checked against its measurement first) to ``target``."""
    with locked(shared=True):
        image = load_image(name)
        manifest_path = image.path / MANIFEST_FILE
        members = [(MANIFEST_FILE, manifest_path, manifest_path.stat().st_size, 0o644)]
        members += [(f"{ROOT_FOLDER}/{record.path}", image.root / record.path, record.size,
                     record.mode) for record in image.files]
        temporary = target.with_name(f".{target.name}.{os.urandom(6).hex()}.tmp")
        try:
            with open(temporary, "xb") as handle, tarfile.open(
                    fileobj=handle, mode="w", format=tarfile.PAX_FORMAT) as archive:
                # PAX only adds a header for a long or non-ASCII name; with integer
                # times and ids it never writes a timestamp.
                for arcname, path, size, mode in sorted(members):
                    with open(path, "rb") as content:
                        archive.addfile(_member(arcname, size, mode), content)
            os.replace(temporary, target)
        except FileNotFoundError as error:
            raise InputError(f"cannot write {target}: {error.strerror}") from None
        finally:
            temporary.unlink(missing_ok=True)
    return image.measurement


def import_image(source: Path, *, name: str | None = None, force: bool = False) -> str:
    """Add the image in archive ``source`` to the store; returns its measurement."""
    if name is not None:
        check_name(name)
    try:
        archive = tarfile.open(source, mode="r:*")  # noqa: SIM115 (closed by the `with` below)
    except FileNotFoundError:
        raise InputError(f"{source} does not exist") from None
    except (tarfile.TarError, OSError):
        raise InputError(f"{source} is not a tar archive (plain, or gzip, bzip2 or xz "
                         "compressed)") from None
    with archive, Staging() as staging:
        manifest = _unpack(archive, staging, str(source))
        files = scan_files(staging.root)
        actual = measurement(manifest.config, files)
        if actual != manifest.measurement:
            raise IntegrityError(f"{source}: its files do not give its recorded measurement "
                                 f"(measurement {actual}, recorded {manifest.measurement}); "
                                 "not imported")
        if tuple(files) != manifest.files:
            raise IntegrityError(f"{source}: manifest.json lists other files than the archive "
                                 "holds; not imported")
        target = name or manifest.name
        manifest = replace(manifest, name=target)
        staging.write_manifest(manifest)
        _check_replace(target, actual, force)
        staging.publish(target)
    return actual


def _check_replace(name: str, measurement_value: str, force: bool) -> None:
    if force or not (image_store_dir() / name).exists():
        return
    try:
        existing = load_image(name, verify=False).measurement
    except TdappError:
        existing = "unreadable"
    if existing != measurement_value:
        raise ConflictError(f"an image named {name} already exists (measurement {existing}); "
                            "give --force to replace it, or --name to import under another name")


def _unpack(archive: tarfile.TarFile, staging: Staging, where: str) -> Manifest:
    manifest_data: bytes | None = None
    seen: set[str] = set()
    for member in archive:
        name = _checked_name(member, where)
        if name is None:
            continue
        if name in seen:
            raise InputError(f"{where}: member {name!r} appears twice; refused")
        seen.add(name)
        content = archive.extractfile(member)
        assert content is not None  # a regular file, checked above
        if name == MANIFEST_FILE:
            if member.size > MAX_MANIFEST_SIZE:
                raise InputError(f"{where}: manifest.json is too large")
            manifest_data = content.read()
        else:
            _write_member(staging, name[len(ROOT_FOLDER) + 1:], member, content, where)
    if manifest_data is None:
        raise InputError(f"{where} is not a tdapp image archive (no {MANIFEST_FILE})")
    return Manifest.from_json(manifest_data, where)


def _checked_name(member: tarfile.TarInfo, where: str) -> str | None:
    """The member's canonical name, None for a folder to skip; refuses everything unsafe."""
    raw = member.name
    if raw.startswith("/"):
        raise InputError(f"{where}: member {raw!r} is an absolute path; refused")
    parts = [part for part in raw.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise InputError(f"{where}: member {raw!r} has a '..' component (path traversal); "
                         "refused")
    name = "/".join(parts)
    if not member.isreg():
        kind = ("a symbolic link" if member.issym() else "a hard link" if member.islnk()
                else "a device node" if member.ischr() or member.isblk()
                else "a FIFO" if member.isfifo() else None)
        if kind is None and member.isdir() and (name in ("", ROOT_FOLDER)
                                                or name.startswith(ROOT_FOLDER + "/")):
            return None  # folders are implied by the files in them
        raise InputError(f"{where}: member {raw!r} is {kind or 'not a regular file'}; an image "
                         "archive holds only regular files; refused")
    if name != MANIFEST_FILE and not name.startswith(ROOT_FOLDER + "/"):
        raise InputError(f"{where}: unexpected member {raw!r} (an image archive holds "
                         f"{MANIFEST_FILE} and {ROOT_FOLDER}/…); refused")
    if member.mode & ~0o777:
        raise InputError(f"{where}: member {raw!r} has setuid, setgid or sticky bits; refused")
    return name


def _write_member(staging: Staging, relative: str, member: tarfile.TarInfo,
                  content: IO[bytes], where: str) -> None:
    check_image_path(relative, InputError)
    try:
        fd = staging.create_file(relative, member.mode)
    except OSError:
        raise InputError(f"{where}: member {member.name!r} clashes with another member; "
                         "refused") from None
    try:
        while chunk := content.read(_COPY_SIZE):
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view):]
    finally:
        os.close(fd)

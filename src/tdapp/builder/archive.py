"""``tdapp image export|import``: an image as a deterministic tar archive.

Owns the archive form (docs/measurement.md, "Archives"): ``manifest.json`` then
``rootfs/<path>`` for every file, folder and symbolic link, sorted, each with
mtime 0, owner 0:0, no user or group names, so one image always gives the same
bytes. Import reads the archive member by member into a staging folder of the
store and never uses tarfile's own extraction. It must never create anything
outside that folder, accept a hard link, a device, a link leading out of the
image or a setuid file, or publish an image whose tree does not give its
recorded measurement.
"""

from __future__ import annotations

import os
import tarfile
from dataclasses import replace
from pathlib import Path
from typing import IO

from tdapp.builder.manifest import Manifest, check_image_path, check_link_target, check_name
from tdapp.builder.measure import MANIFEST_FILE, ROOT_FOLDER, Tree, measurement, scan_tree
from tdapp.builder.store import Staging, image_store_dir, load_image, locked
from tdapp.errors import ConflictError, InputError, IntegrityError, TdappError

MAX_MANIFEST_SIZE = 64 * 1024 * 1024
_COPY_SIZE = 1024 * 1024


def _member(name: str, size: int, mode: int, kind: bytes = tarfile.REGTYPE,
            target: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.type, info.linkname = size, mode, kind, target
    info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
    return info


def export_image(name: str, target: Path) -> str:
    """Write image ``name`` (checked against its measurement first) to ``target``."""
    with locked(shared=True):
        image = load_image(name)
        manifest_path = image.path / MANIFEST_FILE
        members: list[tuple[str, Path | None, tarfile.TarInfo]] = [
            (MANIFEST_FILE, manifest_path,
             _member(MANIFEST_FILE, manifest_path.stat().st_size, 0o644))]
        for record in image.files:
            arcname = f"{ROOT_FOLDER}/{record.path}"
            members.append((arcname, image.root / record.path,
                            _member(arcname, record.size, record.mode)))
        for folder in image.dirs:
            arcname = f"{ROOT_FOLDER}/{folder.path}"
            members.append((arcname, None, _member(arcname, 0, folder.mode, tarfile.DIRTYPE)))
        for link in image.links:
            arcname = f"{ROOT_FOLDER}/{link.path}"
            members.append((arcname, None,
                            _member(arcname, 0, 0o777, tarfile.SYMTYPE, link.target)))
        temporary = target.with_name(f".{target.name}.{os.urandom(6).hex()}.tmp")
        try:
            with open(temporary, "xb") as handle, tarfile.open(
                    fileobj=handle, mode="w", format=tarfile.PAX_FORMAT) as archive:
                # PAX only adds a header for a long or non-ASCII name; with integer
                # times and ids it never writes a timestamp.
                for _, path, info in sorted(members, key=lambda member: member[0]):
                    if path is None:
                        archive.addfile(info)
                        continue
                    with open(path, "rb") as content:
                        archive.addfile(info, content)
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
        tree = scan_tree(staging.root)
        actual = measurement(manifest.config, tree)
        if actual != manifest.measurement:
            raise IntegrityError(f"{source}: its files do not give its recorded measurement "
                                 f"(measurement {actual}, recorded {manifest.measurement}); "
                                 "not imported")
        if tree != Tree.of(manifest):
            raise IntegrityError(f"{source}: manifest.json lists another tree than the archive "
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
    folders: dict[str, int] = {}
    for member in archive:
        name = _checked_name(member, where)
        if name is None:
            continue
        if name in seen:
            raise InputError(f"{where}: member {name!r} appears twice; refused")
        seen.add(name)
        relative = name[len(ROOT_FOLDER) + 1:]
        if member.isdir():
            staging.make_dir(check_image_path(relative, InputError))
            folders[relative] = member.mode
            continue
        if member.issym():
            try:
                staging.make_link(relative, member.linkname)
            except OSError:
                raise _clash(member, where) from None
            continue
        content = archive.extractfile(member)
        assert content is not None  # a regular file, checked above
        if name == MANIFEST_FILE:
            if member.size > MAX_MANIFEST_SIZE:
                raise InputError(f"{where}: manifest.json is too large")
            manifest_data = content.read()
        else:
            _write_member(staging, relative, member, content, where)
    if manifest_data is None:
        raise InputError(f"{where} is not a tdapp image archive (no {MANIFEST_FILE})")
    # Modes last, deepest first: a read-only folder must not stop its children.
    for relative, mode in sorted(folders.items(), key=lambda item: -item[0].count("/")):
        (staging.root / relative).chmod(mode)
    return Manifest.from_json(manifest_data, where)


def _clash(member: tarfile.TarInfo, where: str) -> InputError:
    return InputError(f"{where}: member {member.name!r} clashes with another member; refused")


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
    if member.isdir() and name in ("", ROOT_FOLDER):
        return None
    if not (member.isreg() or member.isdir() or member.issym()):
        kind = ("a hard link" if member.islnk()
                else "a device node" if member.ischr() or member.isblk()
                else "a FIFO" if member.isfifo() else "not a regular file")
        raise InputError(f"{where}: member {raw!r} is {kind}; an image archive holds only "
                         "files, folders and symbolic links; refused")
    if name != MANIFEST_FILE and not name.startswith(ROOT_FOLDER + "/"):
        raise InputError(f"{where}: unexpected member {raw!r} (an image archive holds "
                         f"{MANIFEST_FILE} and {ROOT_FOLDER}/…); refused")
    allowed = 0o1777 if member.isdir() else 0o777
    if member.mode & ~allowed:
        raise InputError(f"{where}: member {raw!r} has setuid, setgid or sticky bits; refused")
    if member.issym():
        try:
            check_link_target(name[len(ROOT_FOLDER) + 1:], member.linkname, InputError)
        except InputError as error:
            raise InputError(f"{where}: {error.message}; refused") from None
    return name


def _write_member(staging: Staging, relative: str, member: tarfile.TarInfo,
                  content: IO[bytes], where: str) -> None:
    check_image_path(relative, InputError)
    try:
        fd = staging.create_file(relative, member.mode)
    except OSError:
        raise _clash(member, where) from None
    try:
        while chunk := content.read(_COPY_SIZE):
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view):]
    finally:
        os.close(fd)

"""``tdapp image export|import``: an image as a deterministic tar archive.

Owns the archive form (docs/measurement.md, "Archives"): ``manifest.json`` then
``rootfs/<path>`` for every file, folder and symbolic link, sorted, each with
mtime 0, owner 0:0, no user or group names, so one image always gives the same
bytes.

Import never uses tarfile's own extraction and reads the archive twice. The
first pass writes nothing: it checks every member (name, kind, mode, link
target), that every member lies in a folder the archive holds (never under a
symbolic link or a file), and that the members are exactly what manifest.json
lists. Only then is the tree written into a staging folder of the store, every
entry relative to folders opened ``O_NOFOLLOW`` (:class:`Staging`), and then
measured from disk (:mod:`tdapp.builder.measure`); the image is published only
if that measurement is the recorded one. Import must never create anything
outside its staging folder, accept a hard link, a device, a link leading out of
the image, a setuid or setgid file or folder, a sticky file, or publish an image
whose tree does not give its recorded measurement.
"""

from __future__ import annotations

import contextlib
import lzma
import os
import tarfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from enum import Enum
from pathlib import Path
from typing import NoReturn

from tdapp.builder.manifest import Manifest, check_image_path, check_link_target, check_name
from tdapp.builder.measure import (
    MANIFEST_FILE,
    ROOT_FOLDER,
    Tree,
    measurement,
    read_manifest,
    scan_tree,
)
from tdapp.builder.store import Staging, image_store_dir, load_image, locked
from tdapp.errors import ConflictError, InputError, IntegrityError, TdappError

MAX_MANIFEST_SIZE = 64 * 1024 * 1024
_COPY_SIZE = 1024 * 1024
_OWNER_ALL = 0o700
_DECODE_ERRORS: tuple[type[BaseException], ...] = (
    tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError, ValueError)


class Kind(Enum):
    """What an image archive's ``rootfs/`` member is; nothing else is accepted."""

    FILE = "file"
    FOLDER = "folder"
    LINK = "symbolic link"


@dataclass(frozen=True)
class _Entry:
    """A checked ``rootfs/`` member, by its path under the image root."""

    member: tarfile.TarInfo
    path: str
    kind: Kind
    mode: int = 0
    size: int = 0
    target: str = ""

    @property
    def shape(self) -> tuple[Kind, int, int, str]:
        """What the manifest records of it besides a file's hash."""
        return self.kind, self.mode, self.size, self.target


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
    where = str(source)
    image_store_dir()  # the store is there (or TDAPP_HOME is refused) before any reading
    try:
        archive = tarfile.open(source, mode="r:*")  # noqa: SIM115 (closed by the `with` below)
    except FileNotFoundError:
        raise InputError(f"{source} does not exist") from None
    except _DECODE_ERRORS:
        raise InputError(f"{source} is not a tar archive (plain, or gzip, bzip2 or xz "
                         "compressed)") from None
    with archive:
        with _reading(where):
            manifest, entries = _survey(archive, where)
        with Staging() as staging:
            _unpack(archive, staging, entries, where)
            target = name or manifest.name
            staging.write_manifest(replace(manifest, name=target))
            _check_measured(staging, manifest, where)
            _check_replace(target, manifest.measurement, force)
            staging.publish(target)
    return manifest.measurement


class _Unreadable(InputError):
    """The archive itself cannot be read (corrupt, truncated, changed while read)."""


@contextlib.contextmanager
def _reading(where: str) -> Iterator[None]:
    try:
        yield
    except _DECODE_ERRORS as error:
        detail = " ".join(str(error).split()) or type(error).__name__
        raise _Unreadable(f"{where} is not a valid tar archive: {detail}") from None


def _check_measured(staging: Staging, manifest: Manifest, where: str) -> None:
    """Measure the staged image as it will be published; refuse it unless it is as recorded."""
    tree = scan_tree(staging.root)
    actual = measurement(read_manifest(staging.path).config, tree)
    if actual != manifest.measurement:
        raise IntegrityError(f"{where}: its files do not give its recorded measurement "
                             f"(measurement {actual}, recorded {manifest.measurement}); "
                             "not imported")
    if tree != Tree.of(manifest):
        raise IntegrityError(f"{where}: manifest.json lists another tree than the archive "
                             "holds; not imported")


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


def _survey(archive: tarfile.TarFile, where: str) -> tuple[Manifest, list[_Entry]]:
    """The first pass, which writes nothing: every member checked, and the manifest."""
    manifest_data: bytes | None = None
    seen: set[str] = set()
    entries: dict[str, _Entry] = {}
    for member in archive:
        name = _checked_name(member, where)
        if name is None:
            continue
        if name in seen:
            raise InputError(f"{where}: member {name!r} appears twice; refused")
        seen.add(name)
        if name == MANIFEST_FILE:
            manifest_data = _manifest_data(archive, member, where)
        else:
            entry = _entry(member, name[len(ROOT_FOLDER) + 1:], where)
            entries[entry.path] = entry
    if manifest_data is None:
        raise InputError(f"{where} is not a tdapp image archive (no {MANIFEST_FILE})")
    _check_folders(entries, where)
    manifest = Manifest.from_json(manifest_data, where)
    _check_listing(manifest, entries.values(), where)
    return manifest, list(entries.values())


def _manifest_data(archive: tarfile.TarFile, member: tarfile.TarInfo, where: str) -> bytes:
    if not member.isreg():
        raise InputError(f"{where}: member {member.name!r} is not a regular file; refused")
    if member.size > MAX_MANIFEST_SIZE:
        raise InputError(f"{where}: manifest.json is too large")
    content = archive.extractfile(member)
    assert content is not None  # a regular file, checked above
    return content.read()


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
    return name


def _entry(member: tarfile.TarInfo, relative: str, where: str) -> _Entry:
    """A ``rootfs/`` member as an entry, refused for a mode or target an image cannot hold."""

    def refuse(reason: str) -> NoReturn:
        raise InputError(f"{where}: member {member.name!r} {reason}; refused")

    try:
        check_image_path(relative, InputError)
        if member.issym():
            check_link_target(relative, member.linkname, InputError)
    except InputError as error:
        refuse(f"is unsafe: {error.message}")
    mode = member.mode
    if member.isdir():
        # A folder keeps its sticky bit (a container image's /tmp is 1777, and it is
        # measured); setuid and setgid never enter the store. Its owner must be able
        # to enter, fill and remove it, or the import could not be measured or undone.
        if mode & ~0o1777:
            refuse(f"has setuid or setgid bits (mode {mode:04o})")
        if mode & _OWNER_ALL != _OWNER_ALL:
            refuse(f"is a folder whose owner may not read, write and enter it "
                   f"(mode {mode:04o})")
        return _Entry(member, relative, Kind.FOLDER, mode)
    if mode & ~0o777:
        refuse(f"has setuid, setgid or sticky bits (mode {mode:04o})")
    if member.issym():
        return _Entry(member, relative, Kind.LINK, target=member.linkname)
    return _Entry(member, relative, Kind.FILE, mode, member.size)


def _check_folders(entries: dict[str, _Entry], where: str) -> None:
    """Every member lies in folders the archive holds: never under a link or a file."""
    for entry in entries.values():
        parts = entry.path.split("/")
        for depth in range(1, len(parts)):
            above = "/".join(parts[:depth])
            holder = entries.get(above)
            if holder is None:
                raise InputError(f"{where}: member {entry.member.name!r} lies in "
                                 f"{ROOT_FOLDER}/{above}, which the archive does not hold "
                                 "as a folder; refused")
            if holder.kind is not Kind.FOLDER:
                raise InputError(f"{where}: member {entry.member.name!r} lies under the "
                                 f"{holder.kind.value} {holder.member.name!r}; refused")


def _check_listing(manifest: Manifest, entries: Iterable[_Entry], where: str) -> None:
    """The members are exactly the files, folders and links manifest.json records."""
    recorded: dict[str, tuple[Kind, int, int, str]] = {}
    recorded.update((record.path, (Kind.FILE, record.mode, record.size, ""))
                    for record in manifest.files)
    recorded.update((record.path, (Kind.FOLDER, record.mode, 0, "")) for record in manifest.dirs)
    recorded.update((record.path, (Kind.LINK, 0, 0, record.target))
                    for record in manifest.links)
    held = {entry.path: entry.shape for entry in entries}
    differing = [path for path in recorded.keys() | held.keys()
                 if recorded.get(path) != held.get(path)]
    if differing:
        raise IntegrityError(f"{where}: manifest.json lists another tree than the archive "
                             f"holds (first difference: {ROOT_FOLDER}/{min(differing)}); "
                             "not imported")


def _unpack(archive: tarfile.TarFile, staging: Staging, entries: list[_Entry],
            where: str) -> None:
    """The second pass: folders first, parents before children, then files and links."""
    folders = sorted((entry for entry in entries if entry.kind is Kind.FOLDER),
                     key=lambda entry: entry.path)
    # Files in archive order, so a compressed archive is read forward only.
    others = [entry for entry in entries if entry.kind is not Kind.FOLDER]
    for entry in folders + others:
        with _writing(entry, where):
            if entry.kind is Kind.FOLDER:
                staging.make_dir(entry.path, entry.mode)
            elif entry.kind is Kind.LINK:
                staging.make_link(entry.path, entry.target)
            else:
                _write_file(archive, staging, entry, where)


@contextlib.contextmanager
def _writing(entry: _Entry, where: str) -> Iterator[None]:
    name = entry.member.name
    try:
        yield
    except _Unreadable:
        raise
    except FileExistsError:
        raise InputError(f"{where}: member {name!r} clashes with another member; "
                         "refused") from None
    except InputError as error:
        raise InputError(f"{where}: member {name!r}: {error.message}; refused") from None
    except OSError as error:
        raise InputError(f"{where}: cannot unpack member {name!r}: "
                         f"{error.strerror or error}") from None


def _write_file(archive: tarfile.TarFile, staging: Staging, entry: _Entry, where: str) -> None:
    with _reading(where):
        content = archive.extractfile(entry.member)
    assert content is not None  # a regular file, checked by the first pass
    fd = staging.create_file(entry.path, entry.mode)
    try:
        while True:
            with _reading(where):
                chunk = content.read(_COPY_SIZE)
            if not chunk:
                break
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view):]
    finally:
        os.close(fd)

"""The local image store, ``$TDAPP_HOME/images/<NAME>/{manifest.json,rootfs/}``.

Owns the store's layout and its one promise: an image appears, or is
replaced, whole and in one step. A new image is assembled in a hidden staging
folder inside the store and renamed into place under the store's lock; a
replaced image is swapped with its successor atomically (``renameat2`` with
``RENAME_EXCHANGE``) and only then deleted. Must never leave a half-written
image under an image's name, nor report an image it has not read, nor create
anything outside its staging folder while assembling one: the staging folder is
written only through folders opened ``O_NOFOLLOW``, never through a link.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import NoReturn

from tdapp.builder.layers import FOLDER_FLAGS, open_folder
from tdapp.builder.manifest import (
    Config,
    DirRecord,
    FileRecord,
    LinkRecord,
    Manifest,
    Source,
    check_image_path,
    check_link_target,
    check_name,
)
from tdapp.builder.measure import MANIFEST_FILE, ROOT_FOLDER, measure_image, read_manifest
from tdapp.errors import InputError, IntegrityError, TdappError
from tdapp.home import private_dir

STAGING_PREFIX = ".staging-"
LOCK_FILE = ".lock"
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_COPY_SIZE = 1024 * 1024


def image_store_dir() -> Path:
    """``$TDAPP_HOME/images``, created (mode 0700) when missing."""
    return private_dir("images")


@dataclass(frozen=True)
class Image:
    """An image in the store, as its manifest describes it.

    ``measurement`` is the value recorded when the image was built or imported;
    :func:`tdapp.builder.measure_image` recomputes the real one from the files.
    """

    name: str
    path: Path
    entrypoint: tuple[str, ...]
    heap: int
    stack: int
    mode: str
    host_paths: tuple[str, ...]
    files: tuple[FileRecord, ...]
    measurement: str
    created: str
    user: str = ""
    dirs: tuple[DirRecord, ...] = ()
    links: tuple[LinkRecord, ...] = ()
    source: Source | None = None

    @property
    def root(self) -> Path:
        """The folder that is ``/`` for the program."""
        return self.path / ROOT_FOLDER

    @property
    def size(self) -> int:
        return sum(record.size for record in self.files)

    @property
    def config(self) -> Config:
        return Config(self.entrypoint, self.heap, self.stack, self.mode, self.host_paths,
                      self.user)

    @classmethod
    def from_manifest(cls, manifest: Manifest, path: Path) -> Image:
        config = manifest.config
        return cls(manifest.name, path, config.entrypoint, config.heap, config.stack,
                   config.mode, config.host_paths, manifest.files, manifest.measurement,
                   manifest.created, config.user, manifest.dirs, manifest.links,
                   manifest.source)


def modified_error(name: str, actual: str, recorded: str) -> IntegrityError:
    return IntegrityError(f"image {name} was modified after it was built "
                          f"(measurement {actual}, recorded {recorded})")


def load_image(name: str, *, verify: bool = True) -> Image:
    """The image called ``name``; with ``verify``, only if its files still match its record."""
    path = image_store_dir() / check_name(name)
    if not path.is_dir() or path.is_symlink():
        raise InputError(f"no image named {name} (build it with 'tdapp build APP_DIR --name "
                         f"{name}', or see 'tdapp images')")
    manifest = read_manifest(path)
    if manifest.name != name:
        raise IntegrityError(f"image folder {name} holds an image named {manifest.name}")
    image = Image.from_manifest(manifest, path)
    if verify:
        actual = measure_image(path)
        if actual != image.measurement:
            raise modified_error(name, actual, image.measurement)
    return image


def list_images() -> tuple[list[Image], list[str]]:
    """Every image in the store (by name), and one line for each that cannot be read."""
    images: list[Image] = []
    problems: list[str] = []
    for entry in sorted(os.scandir(image_store_dir()), key=lambda item: item.name):
        if entry.name.startswith(".") or not entry.is_dir(follow_symlinks=False):
            continue
        try:
            images.append(load_image(entry.name, verify=False))
        except TdappError as error:
            problems.append(f"{entry.name}: {error}")
    return images, problems


@contextlib.contextmanager
def locked(*, shared: bool = False) -> Iterator[None]:
    """Hold the store's lock: exclusive to change it, shared to read an image steadily."""
    fd = os.open(image_store_dir() / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def hold_image(name: str, destination: Path) -> tuple[Image, str]:
    """A private copy of image ``name`` at ``destination`` and its measurement, taken from
    the copy: what runs is exactly what was measured, whatever happens to the store
    afterwards. Refused if the copy does not give the image's recorded measurement."""
    with locked(shared=True):
        stored = load_image(name, verify=False)
        try:
            shutil.copytree(stored.path, destination, symlinks=True)
        except (OSError, shutil.Error) as error:
            raise InputError(f"cannot copy image {name} to {destination}: {error}") from None
    held = Image.from_manifest(read_manifest(destination), destination)
    actual = measure_image(destination)
    if actual != held.measurement:
        raise modified_error(name, actual, held.measurement)
    return held, actual


def remove_image(name: str) -> None:
    path = image_store_dir() / check_name(name)
    with locked():
        if not path.is_dir():
            raise InputError(f"no image named {name}")
        trash = path.with_name(f"{STAGING_PREFIX}{os.urandom(6).hex()}")
        os.rename(path, trash)
    shutil.rmtree(trash)


def normalized_mode(mode: int) -> int:
    """0755 for anything executable, else 0644: the builder's umask must not matter."""
    return 0o755 if mode & 0o111 else 0o644


class Staging:
    """A new image being assembled inside the store, invisible until :meth:`publish`.

    Every entry is written relative to folders opened ``O_NOFOLLOW |
    O_DIRECTORY`` from the staging root (:func:`tdapp.builder.layers.open_folder`):
    a path is never resolved through a symbolic link, so nothing is ever created
    outside the staging folder, whatever links it already holds.
    """

    def __init__(self) -> None:
        self.path = image_store_dir() / f"{STAGING_PREFIX}{os.urandom(8).hex()}"
        self.path.mkdir(mode=0o700)
        self.root = self.path / ROOT_FOLDER
        try:
            self.root.mkdir(mode=0o755)
            self._root_fd = os.open(self.root, FOLDER_FLAGS)
        except BaseException:
            shutil.rmtree(self.path, ignore_errors=True)
            raise
        self._published = False

    def __enter__(self) -> Staging:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        os.close(self._root_fd)
        if not self._published:
            shutil.rmtree(self.path, ignore_errors=True)

    def _parent(self, relative: str) -> tuple[int, str]:
        """The open folder that holds ``relative`` (made when missing), and its last name."""
        parts = tuple(check_image_path(relative, InputError).split("/"))

        def refuse(reason: str) -> NoReturn:
            raise InputError(f"image path {relative!r} {reason}")

        fd = open_folder(self._root_fd, parts[:-1], True, refuse, "written")
        assert fd is not None  # created when missing
        return fd, parts[-1]

    def make_dir(self, relative: str, mode: int = 0o755) -> None:
        """Folder ``relative`` and its missing parents, with explicit modes (no umask)."""
        parent, name = self._parent(relative)
        try:
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, 0o700, dir_fd=parent)
            try:
                fd = os.open(name, FOLDER_FLAGS, dir_fd=parent)
            except OSError as error:
                if error.errno not in (errno.ENOTDIR, errno.ELOOP):
                    raise
                raise InputError(f"image path {relative!r} is already something else than "
                                 "a folder") from None
            try:
                os.fchmod(fd, mode)
            finally:
                os.close(fd)
        finally:
            os.close(parent)

    def create_file(self, relative: str, mode: int) -> int:
        """A new file at ``relative`` under the root (parents made); returns a write fd.

        Raises :class:`FileExistsError` when something is already there.
        """
        parent, name = self._parent(relative)
        try:
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600, dir_fd=parent)
        finally:
            os.close(parent)
        try:
            os.fchmod(fd, mode)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def make_link(self, relative: str, target: str) -> None:
        """Symbolic link ``relative`` -> ``target`` (checked by the manifest's rules).

        Raises :class:`FileExistsError` when something is already there.
        """
        check_link_target(relative, target, InputError)
        parent, name = self._parent(relative)
        try:
            os.symlink(target, name, dir_fd=parent)
        finally:
            os.close(parent)

    def copy_file(self, relative: str, source: str, mode: int) -> None:
        try:
            source_fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as error:
            raise InputError(f"cannot read {source}: {error.strerror}") from None
        try:
            target_fd = self.create_file(relative, mode)
            try:
                while chunk := os.read(source_fd, _COPY_SIZE):
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(target_fd, view):]
            finally:
                os.close(target_fd)
        finally:
            os.close(source_fd)

    def write_manifest(self, manifest: Manifest) -> None:
        (self.path / MANIFEST_FILE).write_bytes(manifest.to_json())

    def publish(self, name: str) -> Path:
        """Put the staged image in place as ``name``, replacing any image of that name."""
        target = image_store_dir() / check_name(name)
        with locked():
            if os.path.lexists(target):
                _replace(str(self.path), str(target))
                self._published = True
                shutil.rmtree(self.path)  # now the previous image
            else:
                os.rename(self.path, target)
                self._published = True
        return target


def _replace(new: str, target: str) -> None:
    """Swap ``new`` into ``target``; afterwards ``new`` holds what ``target`` held."""
    if _exchange(new, target):
        return
    # No RENAME_EXCHANGE here (old kernel or file system): two renames, under the
    # lock; a reader may briefly find no image, but never a partial one.
    aside = f"{new}.previous"
    os.rename(target, aside)
    try:
        os.rename(new, target)
    except BaseException:
        os.rename(aside, target)
        raise
    os.rename(aside, new)


def _exchange(first: str, second: str) -> bool:
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                          ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    if renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second),
                 _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), second)

"""Which files of a built app folder make the image (docs/measurement.md, "Image content").

The rule: if the folder has an ``image.txt``, exactly the files and folders it
lists; otherwise every regular file except build inputs (``Dockerfile``, ``*.c``, ``*.h``,
``*.o``, makefiles, ``build.sh``) and names starting with a dot. Each file keeps
its path: ``APP_DIR/bin/x`` is ``/bin/x`` in the image. This module only
chooses; it must never let a symbolic link, device or other special file into
an image, nor a path that leaves the folder.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from tdapp.builder.compile import BUILD_SCRIPT, MAKEFILES
from tdapp.builder.manifest import check_image_path
from tdapp.errors import InputError

IMAGE_LIST = "image.txt"
EXCLUDED_NAMES = frozenset({*MAKEFILES, BUILD_SCRIPT, IMAGE_LIST, "Dockerfile", "Containerfile"})
EXCLUDED_SUFFIXES = (".c", ".h", ".o")

Selection = dict[str, str]
"""Path in the image (relative to its root) → absolute path of the file to copy."""


def select_files(folder: Path, shown_as: Path) -> Selection:
    """The image's files in the built ``folder``; messages name ``shown_as`` (the user's)."""
    listing = folder / IMAGE_LIST
    if listing.is_file() and not listing.is_symlink():
        selection = _listed(folder, listing, shown_as)
    else:
        selection = {}
        _walk(folder, "", selection, shown_as, everything=False)
    if not selection:
        raise InputError(f"{shown_as} gives no files for the image (build outputs, or the files "
                         f"listed in {IMAGE_LIST})")
    return selection


def is_build_input(name: str) -> bool:
    return name.startswith(".") or name in EXCLUDED_NAMES or name.endswith(EXCLUDED_SUFFIXES)


def _listed(folder: Path, listing: Path, shown_as: Path) -> Selection:
    try:
        lines = listing.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"cannot read {shown_as / IMAGE_LIST}: {error}") from None
    selection: Selection = {}
    for number, line in enumerate(lines, start=1):
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        where = f"{shown_as / IMAGE_LIST} line {number}"
        try:
            relative = check_image_path(entry.lstrip("/").rstrip("/"), InputError)
        except InputError as error:
            raise InputError(f"{where}: {error}") from None
        _check_parents(folder, relative, shown_as)
        path = os.path.join(folder, relative)
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            raise InputError(f"{where}: {relative} does not exist after the build") from None
        if stat.S_ISDIR(info.st_mode):
            # A listed folder is taken whole: listing it is the choice.
            _walk(Path(path), relative + "/", selection, shown_as, everything=True)
        else:
            _add(path, relative, info, selection, shown_as)
    return selection


def _check_parents(folder: Path, relative: str, shown_as: Path) -> None:
    """Every folder on the way to a listed path must be a real folder, not a link out."""
    parts = relative.split("/")[:-1]
    for depth in range(1, len(parts) + 1):
        parent = "/".join(parts[:depth])
        try:
            info = os.lstat(os.path.join(folder, parent))
        except FileNotFoundError:
            return  # reported for the listed path itself
        if not stat.S_ISDIR(info.st_mode):
            raise InputError(f"{shown_as / parent} (on the way to {relative}, listed in "
                             f"{IMAGE_LIST}) is not a folder; links are not followed")


def _walk(directory: Path, prefix: str, selection: Selection, shown_as: Path, *,
          everything: bool) -> None:
    try:
        with os.scandir(directory) as iterator:
            children = sorted(iterator, key=lambda entry: entry.name)
    except OSError as error:
        raise InputError(f"cannot read {shown_as / prefix}: {error.strerror}") from None
    for child in children:
        if not everything and is_build_input(child.name):
            continue
        relative = check_image_path(prefix + child.name, InputError)
        info = child.stat(follow_symlinks=False)
        if stat.S_ISDIR(info.st_mode):
            _walk(Path(child.path), relative + "/", selection, shown_as, everything=everything)
        else:
            _add(child.path, relative, info, selection, shown_as)


def _add(path: str, relative: str, info: os.stat_result, selection: Selection,
         shown_as: Path) -> None:
    if stat.S_ISLNK(info.st_mode):
        raise InputError(f"{shown_as / relative} is a symbolic link; an image holds only regular "
                         f"files (list the image's files in {IMAGE_LIST} to leave it out)")
    if not stat.S_ISREG(info.st_mode):
        raise InputError(f"{shown_as / relative} is not a regular file; an image holds only "
                         "regular files")
    selection[relative] = path

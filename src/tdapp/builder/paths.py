"""Paths as the program will see them: resolved inside an image's root, never on the host.

The program runs with the image's root as ``/``, so a symbolic link in the image
means what it means there: an absolute target starts at the image's root, ``..``
stops at it. These helpers answer questions about such paths from the host
(which program ``sh`` is, which user ``app`` is) without ever following a link
out of the image. They must never return a host path outside ``root``.
"""

from __future__ import annotations

import os
import posixpath
import stat
from pathlib import Path

MAX_LINKS = 40  # as the kernel's limit on links followed while resolving one path


def resolve_in_image(root: Path, path: str) -> Path | None:
    """The host path of ``path`` (absolute, as the program sees it) under ``root``.

    Links are followed inside the image; None when the path does not exist there or
    resolves through too many links.
    """
    pending = [part for part in path.split("/") if part not in ("", ".")]
    resolved: list[str] = []
    followed = 0
    while pending:
        part = pending.pop(0)
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = root.joinpath(*resolved, part)
        try:
            info = candidate.lstat()
        except OSError:
            return None
        if stat.S_ISLNK(info.st_mode):
            followed += 1
            if followed > MAX_LINKS:
                return None
            target = os.readlink(candidate)
            if target.startswith("/"):
                resolved = []
            pending = [p for p in target.split("/") if p not in ("", ".")] + pending
            continue
        resolved.append(part)
    return root.joinpath(*resolved)


def find_program(root: Path, name: str, search_path: str) -> str | None:
    """``name`` as an absolute path in the image, looked up in ``search_path`` if bare."""
    if "/" in name:
        candidate = posixpath.normpath(posixpath.join("/", name))
        return candidate if _executable(resolve_in_image(root, candidate)) else None
    for folder in search_path.split(":"):
        if folder.startswith("/"):
            candidate = posixpath.join(folder, name)
            if _executable(resolve_in_image(root, candidate)):
                return candidate
    return None


def _executable(path: Path | None) -> bool:
    return path is not None and path.is_file() and bool(path.stat().st_mode & 0o111)


def user_ids(root: Path, user: str) -> tuple[int, int] | None:
    """(uid, gid) for ``USER[:GROUP]``, names looked up in the image's own files.

    None when a name is not found there. A numeric user without a group gets the
    group from the image's ``/etc/passwd`` when listed, else the same number.
    """
    name, _, group = user.partition(":")
    passwd = _table(root, "/etc/passwd")
    if name.isdigit():
        uid = int(name)
        gid = next((int(row[3]) for row in passwd if row[2] == name and row[3].isdigit()),
                   uid)
    else:
        row = next((row for row in passwd if row[0] == name), None)
        if row is None or not (row[2].isdigit() and row[3].isdigit()):
            return None
        uid, gid = int(row[2]), int(row[3])
    if group:
        if group.isdigit():
            gid = int(group)
        else:
            match = next((row for row in _table(root, "/etc/group") if row[0] == group), None)
            if match is None or not match[2].isdigit():
                return None
            gid = int(match[2])
    return uid, gid


def _table(root: Path, path: str) -> list[list[str]]:
    """Rows of a colon-separated file of the image (passwd, group), empty when missing."""
    host = resolve_in_image(root, path)
    if host is None or not host.is_file():
        return []
    try:
        text = host.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    return [line.split(":") + [""] * 4 for line in text.splitlines()
            if line and not line.startswith("#")]

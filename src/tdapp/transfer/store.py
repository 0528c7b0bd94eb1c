"""Where the transfer service keeps uploads: the store protocol and the local folder store.

An upload is always written first to a private spool file; only a complete
upload is *published* under its key (``<token>/<name>``): by a rename in the
folder store, by one ``upload_file`` in the S3 store
(:mod:`tdapp.transfer.s3store`). Beside each object the store keeps the
SHA-256 of its delete token (never the token) and its time of publication,
which the service's expiry and DELETE read. Must never make a partial upload
visible under a key, nor keep a delete token itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from aiohttp import web

from tdapp.core.atomic import fsync_directory
from tdapp.errors import UsageError

CHUNK = 256 * 1024
TOKEN_RE = re.compile(r"[A-Za-z0-9_-]{22,64}")
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
DEFAULT_NAME = "file"
# Beside the object in its token folder, a name no object can have (names start with a
# letter or digit): a symbolic link whose target is the digest, never followed. Written
# in one step, and not a file: the store's regular files are exactly its objects.
DELETE_SIDECAR = ".delete-sha256"


def new_token() -> str:
    """A random token of 22 URL-safe characters (128 bits)."""
    return secrets.token_urlsafe(16)


def safe_name(requested: str | None) -> str:
    """A file name fit for a URL path and a folder: its last part, unsafe characters as ``_``."""
    base = (requested or "").replace("\\", "/").rsplit("/", 1)[-1]
    cleaned = _UNSAFE.sub("_", base).lstrip("._-")[:100]
    return cleaned if NAME_RE.fullmatch(cleaned) else DEFAULT_NAME


def valid_key(token: str, name: str) -> bool:
    return bool(TOKEN_RE.fullmatch(token) and NAME_RE.fullmatch(name))


@dataclass(frozen=True)
class StoredObject:
    """A published object: its key, size, when it was published (seconds since the epoch)
    and the hex SHA-256 of its delete token (None for objects stored without one)."""

    token: str
    name: str
    size: int
    created: float
    delete_digest: str | None = None

    @property
    def key(self) -> str:
        return f"{self.token}/{self.name}"


class ObjectStore(Protocol):
    """The service's storage: spool files for uploads, published objects for downloads."""

    description: str

    def spool_dir(self) -> Path:
        """A private folder for uploads in progress (never served)."""
        ...

    async def publish(self, spooled: Path, token: str, name: str, *,
                      delete_digest: str) -> None:
        """Make the complete file ``spooled`` the object ``token/name``; ``spooled`` is consumed."""
        ...

    async def respond(self, token: str, name: str, request: web.Request, *,
                      oldest: float | None) -> web.StreamResponse | None:
        """The download answer for ``token/name``, or None when there is no such object or
        it was published before ``oldest`` (expired)."""
        ...

    async def info(self, token: str, name: str) -> StoredObject | None:
        """The object ``token/name`` with its delete digest, or None."""
        ...

    async def remove(self, token: str, name: str) -> bool:
        """Remove the object ``token/name`` (and what is kept beside it); False if absent."""
        ...

    async def inventory(self) -> list[StoredObject]:
        """Every published object (their delete digests are not read)."""
        ...

    async def tidy(self, older_than: float) -> list[str]:
        """Remove what a killed server left besides spool files, last changed before
        ``older_than``; describe each removal."""
        ...


def remove_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def download_headers(name: str, size: int) -> dict[str, str]:
    return {"Content-Type": "application/octet-stream", "Content-Length": str(size),
            "Content-Disposition": f'attachment; filename="{name}"',
            "X-Content-Type-Options": "nosniff"}


@dataclass
class FolderStore:
    """Objects at ``ROOT/objects/<token>/<name>`` (published at their mtime, the delete
    digest as the target of the link ``.delete-sha256`` beside them); uploads in progress
    in ``ROOT/spool``."""

    root: Path

    def __post_init__(self) -> None:
        for part in ("", "objects", "spool"):
            try:
                (self.root / part).mkdir(mode=0o700, parents=True, exist_ok=True)
            except OSError as error:
                raise UsageError(f"cannot use {self.root} as the transfer store: "
                                 f"{error.strerror or error}") from None
        self.description = f"folder {self.root}"

    def spool_dir(self) -> Path:
        return self.root / "spool"

    def _folder(self, token: str) -> Path:
        return self.root / "objects" / token

    async def publish(self, spooled: Path, token: str, name: str, *,
                      delete_digest: str) -> None:
        folder = self._folder(token)
        try:
            # On disk before its URL is answered: an answered upload survives a crash.
            await asyncio.to_thread(_fsync, spooled)
            folder.mkdir(mode=0o700)
            # The sidecar first: the object appears, by the rename, with its digest there.
            os.symlink(delete_digest, folder / DELETE_SIDECAR)
            now = time.time()
            os.utime(spooled, (now, now))  # its age counts from publication
            os.replace(spooled, folder / name)
            fsync_directory(folder)
            fsync_directory(folder.parent)
        except BaseException:
            remove_quietly(spooled)
            remove_quietly(folder / DELETE_SIDECAR)
            with contextlib.suppress(OSError):
                folder.rmdir()
            raise

    async def respond(self, token: str, name: str, request: web.Request, *,
                      oldest: float | None) -> web.StreamResponse | None:
        path = self._folder(token) / name
        try:
            info = path.stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        if oldest is not None and info.st_mtime < oldest:
            return None
        return web.FileResponse(path, chunk_size=CHUNK,
                                headers=download_headers(name, info.st_size))

    async def info(self, token: str, name: str) -> StoredObject | None:
        folder = self._folder(token)
        try:
            info = (folder / name).stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        try:
            digest: str | None = os.readlink(folder / DELETE_SIDECAR)
        except OSError:
            digest = None  # stored before delete tokens existed: nobody can delete it
        return StoredObject(token, name, info.st_size, info.st_mtime, digest)

    async def remove(self, token: str, name: str) -> bool:
        folder = self._folder(token)
        try:
            # The object first: from here on it is not served, whatever else remains.
            (folder / name).unlink()
        except (FileNotFoundError, NotADirectoryError):
            return False
        remove_quietly(folder / DELETE_SIDECAR)
        with contextlib.suppress(OSError):
            folder.rmdir()
        return True

    async def inventory(self) -> list[StoredObject]:
        found = []
        for folder in (self.root / "objects").iterdir():
            if not TOKEN_RE.fullmatch(folder.name) or not folder.is_dir():
                continue
            for path in folder.iterdir():
                if NAME_RE.fullmatch(path.name):
                    with contextlib.suppress(FileNotFoundError):
                        info = path.stat()
                        found.append(StoredObject(folder.name, path.name, info.st_size,
                                                  info.st_mtime))
        return found

    async def tidy(self, older_than: float) -> list[str]:
        """Token folders holding no object (a server killed while publishing)."""
        removed = []
        for folder in (self.root / "objects").iterdir():
            try:
                if folder.stat().st_mtime >= older_than or not folder.is_dir():
                    continue
                if any(NAME_RE.fullmatch(path.name) for path in folder.iterdir()):
                    continue
                remove_quietly(folder / DELETE_SIDECAR)
                folder.rmdir()
            except OSError:
                continue  # published to, or removed, meanwhile: left for the next sweep
            removed.append(f"the unfinished object folder {folder.name}")
        return removed

"""Where the transfer service keeps uploads: a local folder or an S3 bucket.

An upload is always written first to a private spool file; only a complete
upload is *published* under its key (``<token>/<name>``): by a rename in the
folder store, by one ``upload_file`` in the S3 store. Must never make a
partial upload visible under a key.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

from aiohttp import web

from tdapp.errors import UnavailableError, UsageError

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

CHUNK = 256 * 1024
TOKEN_RE = re.compile(r"[A-Za-z0-9_-]{22,64}")
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
DEFAULT_NAME = "file"


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


class ObjectStore(Protocol):
    """The service's storage: spool files for uploads, published objects for downloads."""

    description: str

    def spool_dir(self) -> Path:
        """A private folder for uploads in progress (never served)."""
        ...

    async def publish(self, spooled: Path, token: str, name: str) -> None:
        """Make the complete file ``spooled`` the object ``token/name``; ``spooled`` is consumed."""
        ...

    async def respond(self, token: str, name: str,
                      request: web.Request) -> web.StreamResponse | None:
        """The download answer for ``token/name``, or None when there is no such object."""
        ...


def remove_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def download_headers(name: str, size: int) -> dict[str, str]:
    return {"Content-Type": "application/octet-stream", "Content-Length": str(size),
            "Content-Disposition": f'attachment; filename="{name}"',
            "X-Content-Type-Options": "nosniff"}


@dataclass
class FolderStore:
    """Objects at ``ROOT/objects/<token>/<name>``; uploads in progress in ``ROOT/spool``."""

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

    async def publish(self, spooled: Path, token: str, name: str) -> None:
        folder = self.root / "objects" / token
        try:
            folder.mkdir(mode=0o700)
            os.replace(spooled, folder / name)
        except BaseException:
            remove_quietly(spooled)
            with contextlib.suppress(OSError):
                folder.rmdir()
            raise

    async def respond(self, token: str, name: str,
                      request: web.Request) -> web.StreamResponse | None:
        path = self.root / "objects" / token / name
        try:
            size = path.stat().st_size
        except (FileNotFoundError, NotADirectoryError):
            return None
        return web.FileResponse(path, chunk_size=CHUNK, headers=download_headers(name, size))


def s3_client() -> S3Client:
    """A boto3 S3 client configured as boto3 does (AWS_ENDPOINT_URL, profiles, …)."""
    import boto3  # imported here: boto3 is slow to import

    client: S3Client = boto3.client("s3")
    return client


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/key`` → ``(bucket, key)``; the key may be empty."""
    parts = urlsplit(url)
    if parts.scheme != "s3" or not parts.netloc:
        raise UsageError(f"{url!r} is not an S3 URL (expected s3://bucket/prefix)")
    return parts.netloc, parts.path.lstrip("/")


class S3Store:
    """Objects at ``s3://BUCKET/PREFIX<token>/<name>``, uploaded only once complete."""

    def __init__(self, url: str, spool: Path) -> None:
        self.bucket, prefix = parse_s3_url(url)
        self.prefix = prefix if not prefix or prefix.endswith("/") else f"{prefix}/"
        self.client = s3_client()
        self.spool = spool
        self.spool.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.description = f"s3://{self.bucket}/{self.prefix}"

    def check(self) -> None:
        """Fail now, with a reason, when the bucket cannot be reached."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except (BotoCoreError, ClientError) as error:
            raise UnavailableError(f"cannot reach the bucket {self.bucket!r}: "
                                   f"{_s3_reason(error)}") from None

    def spool_dir(self) -> Path:
        return self.spool

    def _key(self, token: str, name: str) -> str:
        return f"{self.prefix}{token}/{name}"

    async def publish(self, spooled: Path, token: str, name: str) -> None:
        try:
            await asyncio.to_thread(self.client.upload_file, str(spooled), self.bucket,
                                    self._key(token, name))
        finally:
            remove_quietly(spooled)

    async def respond(self, token: str, name: str,
                      request: web.Request) -> web.StreamResponse | None:
        from botocore.exceptions import ClientError

        try:
            answer = await asyncio.to_thread(self.client.get_object, Bucket=self.bucket,
                                             Key=self._key(token, name))
        except ClientError as error:
            if _s3_status(error) == 404:
                return None
            raise
        body: Any = answer["Body"]
        try:
            response = web.StreamResponse(
                headers=download_headers(name, int(answer["ContentLength"])))
            await response.prepare(request)
            while chunk := await asyncio.to_thread(body.read, CHUNK):
                await response.write(chunk)
            await response.write_eof()
            return response
        finally:
            body.close()


def _s3_status(error: Any) -> int | None:
    meta = getattr(error, "response", {}).get("ResponseMetadata", {})
    status = meta.get("HTTPStatusCode")
    return int(status) if status is not None else None


def _s3_reason(error: Exception) -> str:
    response = getattr(error, "response", None)
    if isinstance(response, dict):
        detail = response.get("Error", {})
        code = detail.get("Code", "")
        message = detail.get("Message", "")
        return " ".join(f"{code} {message}".split()) or str(error)
    return " ".join(str(error).split())

"""Upload a file to, download one from, and delete one at a URL: http(s)://, s3:// or file://.

:func:`upload`, :func:`download` and :func:`delete` dispatch on the URL's
scheme to a :class:`Backend` (like httpx's transports; http(s) is
:mod:`tdapp.transfer.http_backend`). A download is written to a temporary
sibling of its target and renamed only on success, so a failed download leaves
nothing. Failures are one-line UnavailableError (cannot reach, server failed)
or InputError (missing file, refused, 404); a transfer service's answer
``{"kind", "reason"}`` raises the class of its kind
(:func:`tdapp.errors.error_for`).
"""

from __future__ import annotations

import os
import secrets
import socket
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import unquote, urlsplit

from tdapp.core.atomic import atomic_path
from tdapp.core.origin import origin_of
from tdapp.errors import InputError, NotFoundError, UnavailableError, UsageError
from tdapp.transfer.backends import (
    CHUNK,
    Advance,
    Backend,
    ProgressFactory,
    default_progress,
    one_line,
    source_size,
)
from tdapp.transfer.http_backend import HttpBackend

__all__ = ["BACKENDS", "Backend", "FileBackend", "HttpBackend", "ProgressFactory", "S3Backend",
           "backend_for", "check_upload_target", "delete", "download", "upload"]


# -- s3 ------------------------------------------------------------------------------------


def _s3_parts(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    if not parts.netloc:
        raise UsageError(f"{url!r} names no bucket (expected s3://bucket/key)")
    return parts.netloc, unquote(parts.path.lstrip("/"))


def _s3_error(what: str, error: Exception) -> Exception:
    from botocore.exceptions import ClientError, NoCredentialsError

    if isinstance(error, ClientError):
        response: dict[str, Any] = dict(error.response)
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        detail = response.get("Error", {})
        reason = one_line(f"{status or ''} {detail.get('Code', '')} {detail.get('Message', '')}")
        if status is not None and int(status) == 404:
            return NotFoundError(f"{what} failed: {reason}")
        if status is not None and int(status) < 500:
            return InputError(f"{what} failed: {reason}")
        return UnavailableError(f"{what} failed: {reason}")
    if isinstance(error, NoCredentialsError):
        return UnavailableError(f"{what} failed: no AWS credentials found")
    return UnavailableError(f"cannot reach S3 for {what}: {one_line(str(error))}")


class S3Backend:
    """``s3://bucket/key`` through boto3 (endpoint, credentials and region as boto3 finds them)."""

    def _client(self) -> Any:
        from tdapp.transfer.s3store import s3_client

        return s3_client()

    def upload(self, source: Path, destination: str, progress: ProgressFactory) -> str:
        from botocore.exceptions import BotoCoreError, ClientError

        size = source_size(source)
        bucket, key = _s3_parts(destination)
        if not key or key.endswith("/"):
            # A prefix: each upload under a fresh folder, so no upload replaces another.
            key = f"{key}{secrets.token_urlsafe(16)}/{source.name}"
        url = f"s3://{bucket}/{key}"
        try:
            with progress(f"upload {source.name}", size) as advance:
                self._client().upload_file(str(source), bucket, key, Callback=advance)
        except (BotoCoreError, ClientError) as error:
            raise _s3_error(f"upload of {source.name} to {url}", error) from None
        except Exception as error:  # boto3's transfer manager wraps failures
            raise _s3_error(f"upload of {source.name} to {url}", error) from None
        return url

    def download(self, url: str, target: Path, progress: ProgressFactory) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, key = self._object(url)
        client = self._client()
        try:
            size = int(client.head_object(Bucket=bucket, Key=key)["ContentLength"])
            with progress(f"download {target.name}", size) as advance:
                client.download_file(bucket, key, str(target), Callback=advance)
        except (BotoCoreError, ClientError) as error:
            raise _s3_error(f"download of {url}", error) from None

    def delete(self, url: str) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, key = self._object(url)
        client = self._client()
        try:
            client.head_object(Bucket=bucket, Key=key)  # S3 deletes a missing key silently
            client.delete_object(Bucket=bucket, Key=key)
        except (BotoCoreError, ClientError) as error:
            raise _s3_error(f"delete of {url}", error) from None

    @staticmethod
    def _object(url: str) -> tuple[str, str]:
        bucket, key = _s3_parts(url)
        if not key or key.endswith("/"):
            raise UsageError(f"{url!r} names no object (expected s3://bucket/key)")
        return bucket, key


# -- file ----------------------------------------------------------------------------------


def _file_path(url: str) -> Path:
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise UsageError(f"{url!r}: only local file:// URLs are supported")
    return Path(unquote(parts.path))


def _copy(source: BinaryIO, target: BinaryIO, advance: Advance) -> None:
    while chunk := source.read(CHUNK):
        target.write(chunk)
        advance(len(chunk))


class FileBackend:
    """``file:///path``: upload copies into a folder (or to a path); download copies back."""

    def upload(self, source: Path, destination: str, progress: ProgressFactory) -> str:
        size = source_size(source)
        path = _file_path(destination)
        if path.is_dir() or destination.endswith("/"):
            # A folder: each upload in a fresh subfolder, so no upload replaces another.
            path = path / secrets.token_urlsafe(16) / source.name
            if path.parent.parent.is_dir():
                path.parent.mkdir(mode=0o700)
        if not path.parent.is_dir():
            raise InputError(f"upload of {source.name} to {destination} failed: "
                             f"no such folder {path.parent}")
        with atomic_path(path) as temporary, \
                progress(f"upload {source.name}", size) as advance, \
                source.open("rb") as reader, temporary.open("wb") as writer:
            _copy(reader, writer, advance)
        return path.resolve().as_uri()

    def download(self, url: str, target: Path, progress: ProgressFactory) -> None:
        path = _file_path(url)
        try:
            reader = path.open("rb")
        except FileNotFoundError as error:
            raise NotFoundError(f"download of {url} failed: {error.strerror}") from None
        except OSError as error:
            raise InputError(f"download of {url} failed: {error.strerror or error}") from None
        with reader, progress(f"download {target.name}", os.fstat(reader.fileno()).st_size
                              ) as advance, target.open("wb") as writer:
            _copy(reader, writer, advance)

    def delete(self, url: str) -> None:
        path = _file_path(url)
        if path.is_dir():
            raise InputError(f"delete of {url} failed: it is a folder")
        try:
            path.unlink()
        except FileNotFoundError:
            raise NotFoundError(f"delete of {url} failed: no such file") from None
        except OSError as error:
            raise InputError(f"delete of {url} failed: {error.strerror or error}") from None


# -- dispatch ------------------------------------------------------------------------------


BACKENDS: dict[str, Backend] = {"http": HttpBackend(), "https": HttpBackend(),
                                "s3": S3Backend(), "file": FileBackend()}


def backend_for(url: str) -> Backend:
    scheme = urlsplit(url).scheme.lower()
    backend = BACKENDS.get(scheme)
    if backend is None:
        known = ", ".join(f"{name}://" for name in BACKENDS)
        raise UsageError(f"{url!r}: unsupported URL scheme (expected {known})")
    return backend


def check_upload_target(destination: str, what: str = "--push") -> None:
    """Fail now, not after an hour's run, when ``destination`` cannot take an upload: an
    http(s) service that does not answer, or a file:// folder that does not exist (an s3://
    bucket is checked by the upload itself)."""
    backend = backend_for(destination)
    if isinstance(backend, HttpBackend):
        parts = urlsplit(destination)
        port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
        try:
            socket.create_connection((parts.hostname or "", port), timeout=5).close()
        except OSError as error:
            origin = origin_of(destination) or f" ({what})"
            raise UnavailableError(f"nothing answers at {destination}{origin}: "
                                   f"{error.strerror or error}; nothing was run") from None
    elif isinstance(backend, FileBackend):
        path = _file_path(destination)
        folder = path if path.is_dir() or destination.endswith("/") else path.parent
        if not folder.is_dir():
            raise InputError(f"{destination} ({what}): no such folder {folder}; nothing was run")


def upload(source: Path, destination: str, *,
           progress: ProgressFactory = default_progress) -> str:
    """Upload ``source`` to ``destination`` (an upload URL, s3:// or file://); its download URL.

    An http(s) upload's delete token is kept in ``$TDAPP_HOME/uploads.json`` for :func:`delete`.
    """
    return backend_for(destination).upload(Path(source), destination, progress)


def download(url: str, target: Path, *, progress: ProgressFactory = default_progress) -> None:
    """Download ``url`` to ``target``; on failure ``target`` is left as it was."""
    target = Path(target)
    backend = backend_for(url)
    if not target.parent.is_dir():
        raise InputError(f"cannot download to {target}: no such folder {target.parent}")

    def shown(_: str, total: int | None) -> AbstractContextManager[Advance]:
        return progress(f"download {target.name}", total)  # the target's name, not the temp's

    with atomic_path(target) as temporary:
        backend.download(url, temporary, shown)


def delete(url: str) -> None:
    """Delete the object at ``url``: an http(s) download URL with the delete token this user's
    upload kept, or an s3:// or file:// object directly."""
    backend_for(url).delete(url)

"""Upload a file to, and download one from, a URL: http(s)://, s3:// or file://.

:func:`upload` and :func:`download` dispatch on the URL's scheme to a
:class:`Backend` (like httpx's transports). A download is written to a
temporary sibling of its target and renamed only on success, so a failed
download leaves nothing. Failures are one-line UnavailableError (cannot reach,
server failed) or InputError (missing file, refused, 404); a transfer service's
answer ``{"kind", "reason"}`` raises the class of its kind
(:func:`tdapp.errors.error_for`).
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, BinaryIO, Protocol
from urllib.parse import unquote, urlsplit

import httpx

from tdapp.core.atomic import atomic_path
from tdapp.errors import InputError, TdappError, UnavailableError, UsageError, error_for

CHUNK = 256 * 1024
Advance = Callable[[int], None]
# (description, total bytes or None) -> a context manager yielding a callback taking bytes done
ProgressFactory = Callable[[str, int | None], AbstractContextManager[Advance]]


class Backend(Protocol):
    """Moves bytes for one URL scheme."""

    def upload(self, source: Path, destination: str, progress: ProgressFactory) -> str:
        """Send ``source`` to ``destination``; return the URL it can be downloaded from."""
        ...

    def download(self, url: str, target: Path, progress: ProgressFactory) -> None:
        """Write the object at ``url`` to ``target`` (a temporary file the caller renames)."""
        ...


def _default_progress(description: str, total: int | None) -> AbstractContextManager[Advance]:
    from tdapp.core.progress import byte_progress  # imported here: rich loads only when used

    return byte_progress(description, total)


def _one_line(text: str, limit: int = 200) -> str:
    return " ".join(text.split())[:limit]


def _source_size(source: Path) -> int:
    try:
        info = source.stat()
    except OSError as error:
        raise InputError(f"cannot read {source}: {error.strerror or error}") from None
    if not source.is_file():
        raise InputError(f"{source} is not a file")
    return info.st_size


# -- http(s) -----------------------------------------------------------------------------


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class HttpBackend:
    """POST the raw file to an upload URL (the service answers the download URL); GET it back."""

    def __init__(self, timeout: float = 60.0) -> None:
        self.timeout = timeout

    def _client(self, url: str) -> httpx.Client:
        # No proxy from the environment for a service on this host.
        host = urlsplit(url).hostname or ""
        return httpx.Client(timeout=self.timeout, trust_env=not _is_loopback(host),
                            follow_redirects=True)

    def upload(self, source: Path, destination: str, progress: ProgressFactory) -> str:
        size = _source_size(source)
        with progress(f"upload {source.name}", size) as advance, \
                source.open("rb") as handle:
            def body() -> Iterator[bytes]:
                while chunk := handle.read(CHUNK):
                    advance(len(chunk))
                    yield chunk

            headers = {"Content-Length": str(size), "X-File-Name": source.name,
                       "Content-Type": "application/octet-stream"}
            try:
                with self._client(destination) as client:
                    response = client.post(destination, content=body(), headers=headers)
            except httpx.HTTPError as error:
                raise UnavailableError(f"cannot reach {destination}: "
                                       f"{_one_line(str(error)) or type(error).__name__}"
                                       ) from None
        if response.status_code != 200:
            _fail(f"upload of {source.name} to {destination} failed", response)
        lines = response.text.strip().splitlines()
        url = lines[0].strip() if lines else ""
        if not url.startswith(("http://", "https://")):
            raise UnavailableError(f"{destination} answered without a download URL")
        return url

    def download(self, url: str, target: Path, progress: ProgressFactory) -> None:
        try:
            with self._client(url) as client, client.stream("GET", url) as response:
                if response.status_code != 200:
                    response.read()
                    _fail(f"download of {url} failed", response)
                total = response.headers.get("Content-Length")
                expected = int(total) if total and total.isdigit() else None
                received = 0
                with progress(f"download {target.name}", expected) as advance, \
                        target.open("wb") as handle:
                    for chunk in response.iter_bytes(CHUNK):
                        handle.write(chunk)
                        received += len(chunk)
                        advance(len(chunk))
        except httpx.HTTPError as error:
            raise UnavailableError(f"download of {url} failed: "
                                   f"{_one_line(str(error)) or type(error).__name__}") from None
        if expected is not None and received != expected:
            raise UnavailableError(f"download of {url} failed: {received} of {expected} "
                                   "bytes received")


def _fail(what: str, response: httpx.Response) -> None:
    status = response.status_code
    kind, reason = _error_body(response)
    message = f"{what}: {status} {_one_line(reason) or response.reason_phrase}"
    error: type[TdappError]
    if kind is not None:
        error = error_for(kind)
    else:
        # Not a transfer service's answer (a proxy, another upload service): its status.
        error = UnavailableError if status >= 500 else InputError
    raise error(message)


def _error_body(response: httpx.Response) -> tuple[str | None, str]:
    """``(kind, reason)`` of a ``{"kind", "reason"}`` answer, else ``(None, its text)``."""
    try:
        answer = response.json()
    except ValueError:
        answer = None
    if isinstance(answer, dict) and isinstance(answer.get("kind"), str):
        return answer["kind"], str(answer.get("reason", ""))
    return None, response.text


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
        reason = _one_line(f"{status or ''} {detail.get('Code', '')} {detail.get('Message', '')}")
        if status is not None and int(status) < 500:
            return InputError(f"{what} failed: {reason}")
        return UnavailableError(f"{what} failed: {reason}")
    if isinstance(error, NoCredentialsError):
        return UnavailableError(f"{what} failed: no AWS credentials found")
    return UnavailableError(f"cannot reach S3 for {what}: {_one_line(str(error))}")


class S3Backend:
    """``s3://bucket/key`` through boto3 (endpoint, credentials and region as boto3 finds them)."""

    def _client(self) -> Any:
        from tdapp.transfer.store import s3_client

        return s3_client()

    def upload(self, source: Path, destination: str, progress: ProgressFactory) -> str:
        from botocore.exceptions import BotoCoreError, ClientError

        size = _source_size(source)
        bucket, key = _s3_parts(destination)
        if not key or key.endswith("/"):
            key = f"{key}{source.name}"
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

        bucket, key = _s3_parts(url)
        if not key:
            raise UsageError(f"{url!r} names no object (expected s3://bucket/key)")
        client = self._client()
        try:
            size = int(client.head_object(Bucket=bucket, Key=key)["ContentLength"])
            with progress(f"download {target.name}", size) as advance:
                client.download_file(bucket, key, str(target), Callback=advance)
        except (BotoCoreError, ClientError) as error:
            raise _s3_error(f"download of {url}", error) from None


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
        size = _source_size(source)
        path = _file_path(destination)
        if path.is_dir() or destination.endswith("/"):
            path = path / source.name
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
        except OSError as error:
            raise InputError(f"download of {url} failed: {error.strerror or error}") from None
        with reader, progress(f"download {target.name}", os.fstat(reader.fileno()).st_size
                              ) as advance, target.open("wb") as writer:
            _copy(reader, writer, advance)


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
            raise UnavailableError(f"nothing answers at {destination} ({what}): "
                                   f"{error.strerror or error}; nothing was run") from None
    elif isinstance(backend, FileBackend):
        path = _file_path(destination)
        folder = path if path.is_dir() or destination.endswith("/") else path.parent
        if not folder.is_dir():
            raise InputError(f"{destination} ({what}): no such folder {folder}; nothing was run")


def upload(source: Path, destination: str, *,
           progress: ProgressFactory = _default_progress) -> str:
    """Upload ``source`` to ``destination`` (an upload URL, s3:// or file://); its download URL."""
    return backend_for(destination).upload(Path(source), destination, progress)


def download(url: str, target: Path, *, progress: ProgressFactory = _default_progress) -> None:
    """Download ``url`` to ``target``; on failure ``target`` is left as it was."""
    target = Path(target)
    backend = backend_for(url)
    if not target.parent.is_dir():
        raise InputError(f"cannot download to {target}: no such folder {target.parent}")

    def shown(_: str, total: int | None) -> AbstractContextManager[Advance]:
        return progress(f"download {target.name}", total)  # the target's name, not the temp's

    with atomic_path(target) as temporary:
        backend.download(url, temporary, shown)

"""The http(s) backend: POST the raw file to a transfer service's upload URL, GET it back,
DELETE it with the delete token its upload was answered with.

Uploads carry ``Authorization: Bearer`` with this user's upload token when it
has one (:mod:`tdapp.transfer.credentials`); the answer's ``X-Delete-Token`` is
kept in ``$TDAPP_HOME/uploads.json``. A service's answer ``{"kind", "reason"}``
raises the class of its kind (:func:`tdapp.errors.error_for`). Must never put
a token in a message.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from tdapp.core.address import is_loopback
from tdapp.core.origin import origin_of
from tdapp.errors import (
    InputError,
    NotFoundError,
    TdappError,
    UnavailableError,
    error_for,
)
from tdapp.transfer import credentials
from tdapp.transfer.backends import CHUNK, ProgressFactory, one_line, source_size

DELETE_HEADER = "X-Delete-Token"
log = logging.getLogger("tdapp.transfer")


class HttpBackend:
    """POST the raw file to an upload URL (the service answers the download URL); GET it back."""

    def __init__(self, timeout: float = 60.0) -> None:
        self.timeout = timeout

    def _client(self, url: str) -> httpx.Client:
        # No proxy from the environment for a service on this host.
        host = urlsplit(url).hostname or ""
        return httpx.Client(timeout=self.timeout, trust_env=not is_loopback(host),
                            follow_redirects=True)

    def upload(self, source: Path, destination: str, progress: ProgressFactory) -> str:
        size = source_size(source)
        credential = credentials.upload_token()
        with progress(f"upload {source.name}", size) as advance, \
                source.open("rb") as handle:
            def body() -> Iterator[bytes]:
                while chunk := handle.read(CHUNK):
                    advance(len(chunk))
                    yield chunk

            headers = {"Content-Length": str(size), "X-File-Name": source.name,
                       "Content-Type": "application/octet-stream"}
            if credential.token is not None:
                headers["Authorization"] = f"Bearer {credential.token}"
            try:
                with self._client(destination) as client:
                    response = client.post(destination, content=body(), headers=headers)
            except httpx.HTTPError as error:
                raise UnavailableError(f"cannot reach {destination}{origin_of(destination)}: "
                                       f"{one_line(str(error)) or type(error).__name__}"
                                       ) from None
        if response.status_code == 401:
            _fail(f"upload of {source.name} to {destination} failed", response,
                  hint=credential.where)
        if response.status_code != 200:
            _fail(f"upload of {source.name} to {destination} failed", response)
        lines = response.text.strip().splitlines()
        url = lines[0].strip() if lines else ""
        if not url.startswith(("http://", "https://")):
            raise UnavailableError(f"{destination} answered without a download URL")
        delete_token = response.headers.get(DELETE_HEADER)
        if delete_token:
            try:
                credentials.remember(url, delete_token)
            except (TdappError, OSError) as error:
                # The upload is done: it is not undone for want of a place to note its token.
                log.warning("tdapp: warning: the delete token of %s was not kept: %s", url,
                            getattr(error, "message", None) or error)
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
                                   f"{one_line(str(error)) or type(error).__name__}") from None
        if expected is not None and received != expected:
            raise UnavailableError(f"download of {url} failed: {received} of {expected} "
                                   "bytes received")

    def delete(self, url: str) -> None:
        delete_token = credentials.recalled(url)
        if delete_token is None:
            raise InputError(f"no delete token for {url} in {credentials.records_path()}: only "
                             "its uploader (the same user, with the same TDAPP_HOME) can "
                             "delete it")
        try:
            with self._client(url) as client:
                response = client.delete(url, headers={DELETE_HEADER: delete_token})
        except httpx.HTTPError as error:
            raise UnavailableError(f"cannot reach {url}: "
                                   f"{one_line(str(error)) or type(error).__name__}") from None
        if response.status_code in (204, 404):
            credentials.forget(url)  # gone either way: expired, or deleted before
        if response.status_code == 404:
            raise NotFoundError(f"delete of {url} failed: 404 no such download (expired or "
                                "already deleted)")
        if response.status_code != 204:
            _fail(f"delete of {url} failed", response)


def _fail(what: str, response: httpx.Response, hint: str | None = None) -> None:
    status = response.status_code
    kind, reason = _error_body(response)
    message = f"{what}: {status} {one_line(reason) or response.reason_phrase}"
    if hint:
        message = f"{message} ({hint})"
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

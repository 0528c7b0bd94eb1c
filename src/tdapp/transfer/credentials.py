"""The transfer client's secrets: its upload token, and the delete tokens of its uploads.

The upload token is read from the file that ``TDAPP_TRANSFER_TOKEN_FILE`` names
(a path, never the token), else from ``$TDAPP_HOME/transfer.token`` if it
exists. Each upload's delete token is kept in ``$TDAPP_HOME/uploads.json``
(download URL → token; mode 0600, written atomically under a lock, so that
concurrent uploads of one user lose none). Must never put a token in a message,
an argument or the environment.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tdapp.core.atomic import write_atomically
from tdapp.errors import InputError
from tdapp.home import tdapp_home
from tdapp.transfer.access import parse_token_lines

TOKEN_ENV = "TDAPP_TRANSFER_TOKEN_FILE"  # noqa: S105 - names a file, holds no secret
TOKEN_FILE = "transfer.token"  # noqa: S105 - a file name
RECORDS_FILE = "uploads.json"
_LOCK_FILE = "uploads.lock"


@dataclass(frozen=True)
class UploadToken:
    """The token to upload with (None: none found) and, for messages, where it came from
    or where it was looked for."""

    token: str | None = field(repr=False)
    where: str


def upload_token() -> UploadToken:
    """This user's upload token: from ``$TDAPP_TRANSFER_TOKEN_FILE``, else
    ``$TDAPP_HOME/transfer.token``, else none."""
    configured = os.environ.get(TOKEN_ENV)
    default = tdapp_home() / TOKEN_FILE
    if configured:
        source = Path(configured).expanduser()
        try:
            text = source.read_text(errors="replace")
        except OSError as error:
            # The value is not shown: set by mistake, it could be the token itself.
            raise InputError(f"{TOKEN_ENV} names no readable file ({error.strerror or error}); "
                             "set it to the path of a file holding the upload token") from None
        where = f"sent the upload token of {source} (named by {TOKEN_ENV})"
    elif default.is_file():
        source = default
        try:
            text = default.read_text(errors="replace")
        except OSError as error:
            raise InputError(f"cannot read {default}: {error.strerror or error}") from None
        where = f"sent the upload token of {default}"
    else:
        return UploadToken(None, f"no upload token sent: {TOKEN_ENV} is not set and {default} "
                                 "does not exist")
    tokens = parse_token_lines(text, str(source))
    if not tokens:
        raise InputError(f"{source} holds no upload token (one line, at least 16 characters)")
    return UploadToken(tokens[0], where)


def records_path() -> Path:
    return tdapp_home() / RECORDS_FILE


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    home = tdapp_home()
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(home / _LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _read() -> dict[str, str]:
    path = records_path()
    try:
        document = json.loads(path.read_bytes())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, RecursionError) as error:
        raise InputError(f"cannot read {path}: {getattr(error, 'strerror', None) or error}"
                         ) from None
    if not isinstance(document, dict):
        raise InputError(f"{path} is not a JSON object of download URLs and delete tokens")
    return {url: token for url, token in document.items()
            if isinstance(url, str) and isinstance(token, str)}


def _write(records: dict[str, str]) -> None:
    write_atomically(records_path(), (json.dumps(records, indent=1) + "\n").encode(),
                     permissions=0o600)


def remember(url: str, delete_token: str) -> None:
    """Keep the delete token of the upload now at ``url``."""
    with _locked():
        records = _read()
        records[url] = delete_token
        _write(records)


def recalled(url: str) -> str | None:
    """The delete token kept for ``url``, if any."""
    return _read().get(url)


def forget(url: str) -> None:
    """The upload at ``url`` is gone: drop its delete token."""
    with _locked():
        records = _read()
        if records.pop(url, None) is not None:
            _write(records)

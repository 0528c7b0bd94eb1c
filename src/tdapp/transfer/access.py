"""Who may upload to, and delete from, the transfer service: upload and delete tokens.

Upload tokens live in the operator's ``--upload-token-file`` (one a line,
``#`` starts a comment), read again whenever the file changes, so a token is
added or revoked without a restart. Each upload gets a fresh delete token
(128 random bits) that only its uploader receives; the service keeps only its
SHA-256. Every comparison is of SHA-256 digests in constant time
(:func:`hmac.compare_digest`, over every allowed token). Must never log, store
or answer a token, and never accept an upload when the token file cannot be
read (it fails closed).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
from pathlib import Path

from tdapp.errors import UsageError

log = logging.getLogger("tdapp.transfer")
# Shorter lines are not tokens: most likely the half-written line of an editor's save.
MIN_TOKEN_LENGTH = 16


def _bytes(text: str) -> bytes:
    # A header may carry bytes that are not UTF-8 (aiohttp keeps them as surrogates).
    return text.encode("utf-8", "surrogateescape")


def new_delete_token() -> str:
    """A fresh delete token: 128 random bits, URL-safe."""
    return secrets.token_urlsafe(16)


def token_digest(token: str) -> str:
    """The hex SHA-256 of a token: what the service keeps of it."""
    return hashlib.sha256(_bytes(token)).hexdigest()


def digest_matches(presented: str | None, digest: str | None) -> bool:
    """Whether ``presented`` is the token whose SHA-256 is ``digest`` (constant time)."""
    if presented is None or digest is None:
        return False
    return hmac.compare_digest(token_digest(presented).encode(), digest.encode())


def parse_token_lines(text: str, where: str) -> list[str]:
    """The tokens of a token file's text: one a line, ``#`` comments and blank lines skipped."""
    tokens = []
    for number, line in enumerate(text.splitlines(), 1):
        token = line.split("#", 1)[0].strip()
        if not token:
            continue
        if len(token) < MIN_TOKEN_LENGTH or any(c.isspace() for c in token):
            log.warning("%s line %d: not a token (one word of at least %d characters); "
                        "ignored", where, number, MIN_TOKEN_LENGTH)
            continue
        tokens.append(token)
    return tokens


class UploadTokens:
    """The tokens of a token file, re-read when its mtime, size or inode change."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._signature: tuple[int, int, int] | None = None
        self._digests: list[bytes] = []
        try:
            self._signature, self._digests = self._read()
        except OSError as error:
            raise UsageError(f"--upload-token-file {path}: {error.strerror or error}") from None
        if not self._digests:
            log.warning("%s holds no token: every upload is refused until one is added", path)

    def _read(self) -> tuple[tuple[int, int, int], list[bytes]]:
        with self.path.open("rb") as handle:
            info = os.fstat(handle.fileno())
            text = handle.read().decode("utf-8", errors="replace")
        tokens = parse_token_lines(text, str(self.path))
        return ((info.st_mtime_ns, info.st_size, info.st_ino),
                [hashlib.sha256(token.encode()).digest() for token in tokens])

    def _refresh(self) -> None:
        try:
            info = self.path.stat()
            if (info.st_mtime_ns, info.st_size, info.st_ino) == self._signature:
                return
            self._signature, self._digests = self._read()
            log.info("re-read %s: %d upload token(s)", self.path, len(self._digests))
        except OSError as error:
            if self._signature is not None:
                log.error("cannot read %s (%s): every upload is refused until it can be",
                          self.path, error.strerror or error)
            self._signature, self._digests = None, []

    def allows(self, presented: str) -> bool:
        """Whether ``presented`` is one of the file's tokens as it is now."""
        self._refresh()
        candidate = hashlib.sha256(_bytes(presented)).digest()
        found = False
        for digest in self._digests:  # every one compared: the time tells nothing
            found |= hmac.compare_digest(candidate, digest)
        return found

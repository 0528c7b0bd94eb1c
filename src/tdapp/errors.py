"""The error vocabulary of tdapp.

Every failure a user can cause is a :class:`TdappError` subclass carrying one
line of text and the process exit code the CLI uses for its kind. Library code
raises these; only the CLI turns them into ``tdapp: error: …`` and an exit code.
Nothing here may ever include key material in a message.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Process exit codes, one per kind of failure (documented in docs/cli.md)."""

    OK = 0
    INTERNAL = 1
    USAGE = 2
    INPUT = 3
    INTEGRITY = 4
    WRONG_KEY = 5
    UNAVAILABLE = 6
    REFUSED = 7
    CONFLICT = 8
    PROGRAM_FAILED = 9
    INTERRUPTED = 130


class TdappError(Exception):
    """Base of every expected failure: one line of text and an exit code."""

    exit_code: ExitCode = ExitCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class UsageError(TdappError):
    """A malformed argument: bad hex, an unknown region kind, a bad size."""

    exit_code = ExitCode.USAGE


class InputError(TdappError):
    """Input that is missing or unusable: no such folder, not a volume, a symlink."""

    exit_code = ExitCode.INPUT


class IntegrityError(TdappError):
    """Stored data failed authentication or freshness: tampering or rollback."""

    exit_code = ExitCode.INTEGRITY


class WrongKeyError(TdappError):
    """The key given does not open this volume."""

    exit_code = ExitCode.WRONG_KEY


class UnavailableError(TdappError):
    """A service could not be reached or answered that it cannot serve now."""

    exit_code = ExitCode.UNAVAILABLE


class RefusedError(TdappError):
    """A service refused the request: permission, attestation or policy."""

    exit_code = ExitCode.REFUSED


class ConflictError(TdappError):
    """A compare-and-swap lost: stale predecessor or tag, or a concurrent writer."""

    exit_code = ExitCode.CONFLICT


class ProgramFailedError(TdappError):
    """The DApp itself failed: non-zero exit status or killed."""

    exit_code = ExitCode.PROGRAM_FAILED

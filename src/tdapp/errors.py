"""The error vocabulary of tdapp.

Every failure a user can cause is a :class:`TdappError` subclass carrying one
line of text, the process exit code the CLI uses for its kind, and its kind on
the wire: an :class:`ErrorKind` and the HTTP status a service answers it with
(the body is ``{"kind", "reason"}``, see :mod:`tdapp.webjson`). Library code
raises these; only the CLI turns them into ``tdapp: error: …`` and an exit
code, and a client turns a service's kind back into its class with
:func:`error_for`. Nothing here may ever include key material in a message.
"""

from __future__ import annotations

from enum import IntEnum, StrEnum
from typing import assert_never


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


class ErrorKind(StrEnum):
    """What went wrong, as a service names it in an error body (docs/cas.md, "Errors")."""

    USAGE = "usage"
    INPUT = "input"
    TOO_LARGE = "too_large"
    TIMEOUT = "timeout"
    NOT_FOUND = "not_found"
    AUTHENTICATION_REQUIRED = "authentication_required"
    REFUSED = "refused"
    CONFLICT = "conflict"
    INTEGRITY = "integrity"
    WRONG_KEY = "wrong_key"
    UNAVAILABLE = "unavailable"
    OVERLOADED = "overloaded"
    PROGRAM_FAILED = "program_failed"
    INTERNAL = "internal"


class TdappError(Exception):
    """Base of every expected failure: one line of text, an exit code, a kind on the wire."""

    exit_code: ExitCode = ExitCode.INTERNAL
    kind: ErrorKind = ErrorKind.INTERNAL
    http_status: int = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class UsageError(TdappError):
    """A malformed argument: bad hex, an unknown region kind, a bad size."""

    exit_code = ExitCode.USAGE
    kind = ErrorKind.USAGE
    http_status = 400


class InputError(TdappError):
    """Input that is missing or unusable: no such folder, not a volume, a symlink."""

    exit_code = ExitCode.INPUT
    kind = ErrorKind.INPUT
    http_status = 400


class IntegrityError(TdappError):
    """Stored data failed authentication or freshness: tampering or rollback."""

    exit_code = ExitCode.INTEGRITY
    kind = ErrorKind.INTEGRITY
    # A service's own store failing authentication is its trouble, not the caller's
    # request's: the CAS cannot serve until an operator looks (docs/cas.md, "Errors").
    http_status = 503


class WrongKeyError(TdappError):
    """The key given does not open this volume."""

    exit_code = ExitCode.WRONG_KEY
    kind = ErrorKind.WRONG_KEY
    http_status = 400


class UnavailableError(TdappError):
    """A service could not be reached or answered that it cannot serve now."""

    exit_code = ExitCode.UNAVAILABLE
    kind = ErrorKind.UNAVAILABLE
    http_status = 503


class RefusedError(TdappError):
    """A service refused the request: permission, attestation or policy."""

    exit_code = ExitCode.REFUSED
    kind = ErrorKind.REFUSED
    http_status = 403


class ConflictError(TdappError):
    """A compare-and-swap lost: stale predecessor or tag, or a concurrent writer."""

    exit_code = ExitCode.CONFLICT
    kind = ErrorKind.CONFLICT
    http_status = 409


class ProgramFailedError(TdappError):
    """The DApp itself failed: non-zero exit status or killed."""

    exit_code = ExitCode.PROGRAM_FAILED
    kind = ErrorKind.PROGRAM_FAILED
    http_status = 500


class TooLargeError(InputError):
    """A request or upload over the limit its endpoint sets (HTTP 413)."""

    kind = ErrorKind.TOO_LARGE
    http_status = 413


class NotFoundError(InputError):
    """The named session, volume, download or path does not exist (HTTP 404)."""

    kind = ErrorKind.NOT_FOUND
    http_status = 404


class TimedOutError(UnavailableError):
    """A service stopped waiting for a request that stalled past its timeout (HTTP 408)."""

    kind = ErrorKind.TIMEOUT
    http_status = 408


class OverloadedError(UnavailableError):
    """A service has too much work in progress; retry after a while.

    HTTP 503 when the service as a whole is busy; a refusal of one client's own
    excess (:class:`tdapp.webjson.Overloaded`) is answered 429. Either way nothing
    of the request was done, and the answer carries a Retry-After.
    """

    kind = ErrorKind.OVERLOADED
    http_status = 503


class AuthenticationRequired(RefusedError):
    """The request needs a client certificate, or a token, it did not present (HTTP 401)."""

    kind = ErrorKind.AUTHENTICATION_REQUIRED
    http_status = 401


def error_class(kind: ErrorKind) -> type[TdappError]:
    """The class whose errors are of ``kind`` (what a service raises for it)."""
    match kind:
        case ErrorKind.USAGE:
            return UsageError
        case ErrorKind.INPUT:
            return InputError
        case ErrorKind.TOO_LARGE:
            return TooLargeError
        case ErrorKind.TIMEOUT:
            return TimedOutError
        case ErrorKind.NOT_FOUND:
            return NotFoundError
        case ErrorKind.AUTHENTICATION_REQUIRED:
            return AuthenticationRequired
        case ErrorKind.REFUSED:
            return RefusedError
        case ErrorKind.CONFLICT:
            return ConflictError
        case ErrorKind.INTEGRITY:
            return IntegrityError
        case ErrorKind.WRONG_KEY:
            return WrongKeyError
        case ErrorKind.UNAVAILABLE:
            return UnavailableError
        case ErrorKind.OVERLOADED:
            return OverloadedError
        case ErrorKind.PROGRAM_FAILED:
            return ProgramFailedError
        case ErrorKind.INTERNAL:
            return TdappError
        case unreachable:
            assert_never(unreachable)


def error_for(kind: str) -> type[TdappError]:
    """What a client raises for a service's error body of ``kind``.

    A kind this version does not know (a newer service, a proxy's body) and a
    service's internal failure are UnavailableError: the service could not serve
    the request, and nothing says the caller did anything wrong.
    """
    try:
        known = ErrorKind(kind)
    except ValueError:
        return UnavailableError
    if known is ErrorKind.INTERNAL:
        return UnavailableError
    return error_class(known)

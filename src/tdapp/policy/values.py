"""The scalar vocabulary of the session language: names, hex values, paths, placeholders.

Each type here is a pydantic ``Annotated`` type that validates and normalizes
one kind of value (hex is lower-cased, paths lose repeated slashes, set-like
lists are sorted). Failures are raised with :func:`fail`, whose text becomes
the detail of a :class:`~tdapp.policy.errors.SessionError`. A failure message
must never repeat a value that could be key material (hex keys, secret values,
one-time-password secrets).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Annotated, Any, NoReturn

from pydantic import AfterValidator, BeforeValidator, JsonValue, Strict
from pydantic_core import PydanticCustomError

from tdapp.policy.reader import Key, Plain, format_path

ERROR_TYPE = "session"

PLACEHOLDER = re.compile(r"\$\$SCONE::[A-Za-z0-9_][A-Za-z0-9_.:-]{0,255}\$\$")
TEMPLATE_VARIABLE = re.compile(r"\$\{?[A-Za-z_][A-Za-z0-9_]*\}?")
_HEX = re.compile(r"[0-9a-f]*")
# RFC 3986 unreserved characters: SCONE's rule for session and service names.
_UNRESERVED = re.compile(r"[A-Za-z0-9_.~-]{1,128}")
SECRET_NAME = re.compile(r"[A-Za-z0-9_-]{1,128}")
_IMAGE_NAME = re.compile(r"[A-Za-z0-9_.:/@-]{1,255}")
_TAG = re.compile(r"[^\s\x00]{1,128}")
_BASE32 = re.compile(r"[A-Z2-7]+=*")


def fail(detail: str, *at: Key) -> NoReturn:
    """Refuse a value. ``at`` is a key path below the validated value, to point at the line."""
    raise PydanticCustomError(ERROR_TYPE, "{detail}", {"detail": detail, "at": at})


def describe(value: object) -> str:
    """What kind of YAML value this is, for "expected X, got Y" messages."""
    if value is None:
        return "null"
    if isinstance(value, Plain):
        return {"bool": "a boolean", "int": "an integer", "float": "a number"}[value.kind]
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list | tuple):
        return "a list"
    return "a mapping"


def quoted(text: str, limit: int = 40) -> str:
    """A short, one-line, quoted rendering of a non-secret value for a message."""
    shown = text if len(text) <= limit else text[: limit - 1] + "…"
    return repr(shown)


def is_placeholder(value: object) -> bool:
    """A whole ``$$SCONE::name[:format]$$`` placeholder (a reference to a secret)."""
    return isinstance(value, str) and PLACEHOLDER.fullmatch(value) is not None


# -- plain scalars -----------------------------------------------------------------------


def as_text(value: object) -> object:
    # Where a string is expected, an unquoted `0.3`, `007` or `true` is its text.
    return value.text if isinstance(value, Plain) else value


def _as_int(value: object) -> object:
    if isinstance(value, Plain) and value.kind == "int":
        try:
            return value.number()
        except ValueError:
            fail("integer is too large")
    return value


def _as_flag(value: object) -> object:
    if isinstance(value, Plain) and value.kind == "bool":
        return value.number()
    return value


def _no_nul(value: str) -> str:
    if "\x00" in value:
        fail("contains a NUL character")
    return value


Text = Annotated[str, BeforeValidator(as_text), Strict(), AfterValidator(_no_nul)]
Int = Annotated[int, BeforeValidator(_as_int), Strict()]


def _as_file_mode(value: object) -> object:
    # YAML 1.2 reads `0400` as the decimal 400 (mode 0620): never what a permission means.
    if (isinstance(value, Plain) and value.kind == "int" and len(value.text) > 1
            and value.text.lstrip("+-").startswith("0") and value.text.lstrip("+-")[1:2].isdigit()):
        fail(f"{value.text} is read as a decimal number here; write the mode as "
             f"0o{value.text.lstrip('+-0') or '0'} (octal) or as a decimal")
    return _as_int(value)


FileMode = Annotated[int, BeforeValidator(_as_file_mode), Strict()]
Flag = Annotated[bool, BeforeValidator(_as_flag), Strict()]


def int_range(low: int, high: int) -> AfterValidator:
    def check(value: int) -> int:
        if not low <= value <= high:
            fail(f"expected an integer from {low} to {high}, got {value}")
        return value

    return AfterValidator(check)


U16 = Annotated[Int, int_range(0, 0xFFFF)]
U64 = Annotated[Int, int_range(0, 2**64 - 1)]


def free_form(value: object) -> JsonValue:
    """Unwrap a structured value (a config fragment) into JSON-compatible data."""
    if isinstance(value, Plain):
        try:
            number = value.number()
        except ValueError:
            fail("integer is too large")
        if isinstance(number, float) and not math.isfinite(number):
            fail("infinite and NaN numbers are not allowed")
        return number
    if isinstance(value, dict):
        return {str(key): free_form(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [free_form(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        fail("infinite and NaN numbers are not allowed")
    if value is None or isinstance(value, str | bool | int | float):
        return value
    fail(f"expected YAML data, got {type(value).__name__}")


FreeForm = Annotated[JsonValue, BeforeValidator(free_form)]


# -- collections -------------------------------------------------------------------------


def _none_as_empty(value: object) -> object:
    # `volumes:` with nothing under it means no volumes.
    return () if value is None else value


def _one_or_many(value: object) -> object:
    if value is None:
        return ()
    return [value] if isinstance(value, str | Plain) else value


def _sorted_set(values: tuple[str, ...]) -> tuple[str, ...]:
    # Set-like lists are kept sorted and without repeats, so that their order
    # (which means nothing) does not change the session's hash.
    return tuple(sorted(set(values)))


Many = BeforeValidator(_none_as_empty)
OneOrMany = BeforeValidator(_one_or_many)
SortedSet = AfterValidator(_sorted_set)


def unique_names(items: Sequence[Any], what: str, *at: Key, field: str = "name"
                 ) -> dict[str, int]:
    """Index items by name, refusing a repeated name (pointing at the second one)."""
    seen: dict[str, int] = {}
    for index, item in enumerate(items):
        name = getattr(item, field)
        if name in seen:
            fail(f"duplicate {what} {quoted(name)} (also at {format_path((*at, seen[name]))})",
                 *at, index, field)
        seen[name] = index
    return seen


# -- hex ---------------------------------------------------------------------------------


def hex_string(length: int, what: str) -> Callable[[str], str]:
    def check(value: str) -> str:
        lowered = value.lower()
        if len(lowered) == length and _HEX.fullmatch(lowered):
            return lowered
        if TEMPLATE_VARIABLE.fullmatch(value):
            fail(f"expected {what} ({length} hex characters), got the unfilled template "
                 f"variable {value}")
        if len(value) != length:
            fail(f"expected {what} ({length} hex characters), got {len(value)} characters")
        fail(f"expected {what} ({length} hex characters), got non-hex characters")

    return check


Hash = Annotated[Text, AfterValidator(hex_string(64, "a SHA-256 hash"))]
Measurement = Annotated[Text, AfterValidator(hex_string(64, "an enclave measurement"))]
FspfKey = Annotated[Text, AfterValidator(hex_string(64, "a 32-byte key"))]
FspfTag = Annotated[Text, AfterValidator(hex_string(32, "a 16-byte tag"))]
Measurements = Annotated[tuple[Measurement, ...], OneOrMany, SortedSet]
Register = Annotated[Text, AfterValidator(hex_string(96, "a 48-byte measurement register"))]
Registers = Annotated[tuple[Register, ...], OneOrMany, SortedSet]


def is_binary_hex(value: str) -> bool:
    return bool(value) and len(value) % 2 == 0 and _HEX.fullmatch(value.lower()) is not None


# -- names -------------------------------------------------------------------------------


def _matching(pattern: re.Pattern[str], what: str, allowed: str) -> Callable[[str], str]:
    def check(value: str) -> str:
        if not pattern.fullmatch(value):
            hint = " (unfilled template variable?)" if "$" in value else ""
            fail(f"{quoted(value)} is not a valid {what}: {allowed}{hint}")
        return value

    return check


def _session_name(value: str) -> str:
    parts = value.split("/")
    if len(value) > 128 or not all(_UNRESERVED.fullmatch(part) for part in parts) or any(
            part in (".", "..") for part in parts):
        hint = " (unfilled template variable?)" if "$" in value else ""
        fail(f"{quoted(value)} is not a valid session name: 1 to 128 characters from "
             f"A-Z a-z 0-9 _ - . ~, with '/' between namespace parts{hint}")
    return value


def _session_ref(value: str) -> str:
    # Another session: a name (ns/name), or relative to this one (./name, ../name).
    rest = value
    if rest.startswith("./"):
        rest = rest[2:]
    while rest.startswith("../"):
        rest = rest[3:]
    parts = rest.split("/")
    if len(value) > 256 or not all(_UNRESERVED.fullmatch(part) and part not in (".", "..")
                                   for part in parts):
        fail(f"{quoted(value)} is not a valid session reference: a session name, optionally "
             "ns/name, ./name or ../name")
    return value


_SIMPLE = "1 to 128 characters from A-Z a-z 0-9 _ - . ~"
SessionName = Annotated[Text, AfterValidator(_session_name)]
SessionRef = Annotated[Text, AfterValidator(_session_ref)]
ServiceName = Annotated[Text, AfterValidator(_matching(_UNRESERVED, "service name", _SIMPLE))]
VolumeName = Annotated[Text, AfterValidator(_matching(_UNRESERVED, "volume name", _SIMPLE))]
# No '.' or ':' in secret names: `$$SCONE::name.crt$$` and `name:crt` are formats.
SecretName = Annotated[Text, AfterValidator(_matching(
    SECRET_NAME, "secret name", "1 to 128 characters from A-Z a-z 0-9 _ -"))]
ImageName = Annotated[Text, AfterValidator(_matching(
    _IMAGE_NAME, "image name", "1 to 255 characters from A-Z a-z 0-9 _ - . : / @"))]
Tags = Annotated[tuple[Annotated[Text, AfterValidator(_matching(
    _TAG, "tag", "1 to 128 characters, no whitespace"))], ...], OneOrMany, SortedSet]


# -- paths, placeholders, secrets ------------------------------------------------------------


def _absolute_path(value: str) -> str:
    if not value.startswith("/"):
        fail(f"{quoted(value)} is not an absolute path")
    parts = [part for part in value.split("/") if part]
    if any(part in (".", "..") for part in parts):
        fail(f"{quoted(value)} has a '.' or '..' component")
    return "/" + "/".join(parts)


AbsolutePath = Annotated[Text, AfterValidator(_absolute_path)]


def _placeholder(value: str) -> str:
    if not is_placeholder(value):
        fail("expected a complete $$SCONE::name$$ placeholder")
    return value


Placeholder = Annotated[Text, AfterValidator(_placeholder)]


def _otp_secret(value: str) -> str:
    # A TOTP shared secret: base32 (RFC 4648) of at least 128 bits, or a reference.
    if is_placeholder(value):
        return value
    if not _BASE32.fullmatch(value):
        fail("expected a base32 secret (A-Z, 2-7) or a $$SCONE::name$$ placeholder")
    if len(value.rstrip("=")) * 5 < 128:
        fail("one-time password secret is shorter than 128 bits")
    return value


OtpSecret = Annotated[Text, AfterValidator(_otp_secret)]

"""``parse_session``: session text in, a validated :class:`Session` or one clear error out.

The YAML layer (:mod:`tdapp.policy.reader`) gives plain data plus the line of
every key and value; the model validates it; this module turns the first
validation failure into ``SOURCE:LINE: KEY.PATH: detail``. It must raise
nothing but :class:`SessionError` for any input text.
"""

from __future__ import annotations

import difflib
from typing import Any, get_args

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from tdapp.policy.errors import SessionError
from tdapp.policy.model import Session
from tdapp.policy.reader import Document, Path, format_path, read_document
from tdapp.policy.values import ERROR_TYPE, describe, quoted

_MAPPING_ERRORS = frozenset({"dict_type", "model_type", "model_attributes_type",
                             "mapping_type"})
_LIST_ERRORS = frozenset({"list_type", "tuple_type", "iterable_type"})
# Top-level keys that belong one level down, and where.
_MISPLACED = {"attestation": "security (security.attestation) or under a service",
              "mode": "security.attestation", "tolerate": "security.attestation",
              "ignore_advisories": "security.attestation", "environment": "a service",
              "command": "a service", "mrenclaves": "a service or an image",
              "fspf_key": "a volume or a service", "fspf_tag": "a volume or a service"}


def parse_session(text: str, *, source: str = "session") -> Session:
    """Parse and validate one session document."""
    return parse_session_document(text, source=source)[0]


def parse_session_document(text: str, *, source: str = "session") -> tuple[Session, Document]:
    """Parse and validate one session document; the session and the document's lines."""
    document = read_document(text, source)
    if not isinstance(document.data, dict):
        raise SessionError(f"expected a session mapping at the top level, got "
                           f"{describe(document.data)}", source=source, line=1)
    try:
        return Session.model_validate(document.data), document
    except ValidationError as error:
        raise _explain(error, document, source) from None


def line_of(document: Document, path: Path) -> int | None:
    """The line of the key at ``path``, else of its value, else of the nearest parent."""
    return document.key_lines.get(path) or _line(document.value_lines, path)


def _explain(error: ValidationError, document: Document, source: str) -> SessionError:
    problems = error.errors(include_url=False)
    first = problems[0]
    path, rest = _walk(document.data, tuple(first["loc"]))
    ctx: dict[str, Any] = dict(first.get("ctx") or {})
    kind = first["type"]
    if kind == ERROR_TYPE and ctx.get("at"):
        # A rule checked on a whole record points at the key it is about.
        path, rest = _walk(document.data, (*path, *rest, *ctx["at"]))
    on_key = kind == "extra_forbidden" or "[key]" in first["loc"]
    if kind == "extra_forbidden" and not rest and path:
        line = document.key_lines.get(path) or _line(document.value_lines, path)
        where, detail = path[:-1], _unknown_key(str(path[-1]), path[:-1])
    elif kind == "missing":
        line = _line(document.value_lines, path)
        missing = rest[-1] if rest else first["loc"][-1]
        where, detail = path, f"missing required key {str(missing)!r}"
    else:
        lines = document.key_lines if on_key else document.value_lines
        line = lines.get(path) or _line(document.value_lines, path)
        where, detail = path, _detail(kind, first["msg"], first.get("input"), ctx)
    if len(problems) > 1:
        detail += f" (and {len(problems) - 1} more problem{'s' if len(problems) > 2 else ''})"
    return SessionError(detail, source=source, line=line, path=format_path(where))


def _walk(data: object, loc: tuple[Any, ...]) -> tuple[Path, tuple[Any, ...]]:
    """Follow ``loc`` through the document; returns (path found, the rest of loc).

    Elements that are not keys or indexes of the data (validator-internal parts,
    or positions in a form the model normalized) are skipped.
    """
    path: list[str | int] = []
    current = data
    skipped: list[Any] = []
    for element in loc:
        if _has(current, element):
            path.append(element)
            current = current[element]  # type: ignore[index]
            skipped = []
        else:
            skipped.append(element)
    return tuple(path), tuple(skipped)


def _has(data: object, element: object) -> bool:
    if isinstance(data, dict):
        return isinstance(element, str) and element in data
    if isinstance(data, list):
        return type(element) is int and 0 <= element < len(data)
    return False


def _line(lines: dict[Path, int], path: Path) -> int | None:
    for end in range(len(path), -1, -1):
        if path[:end] in lines:
            return lines[path[:end]]
    return None


def _unknown_key(key: str, parent: Path) -> str:
    where = "at the top level" if not parent else ""
    text = f"unknown key {quoted(key)} {where}".rstrip()
    if not parent and key in _MISPLACED:
        return f"{text} ({key} belongs under {_MISPLACED[key]})"
    close = difflib.get_close_matches(key, sorted(_known_keys(parent)), n=1, cutoff=0.75)
    return f"{text} (did you mean {close[0]!r}?)" if close else text


def _known_keys(path: Path) -> set[str]:
    """The keys the language allows at ``path`` (for "did you mean" hints)."""
    model: type[BaseModel] | None = Session
    for element in path:
        if model is None:
            return set()
        if isinstance(element, str):
            field = _fields(model).get(element)
            model = None if field is None else _model_in(field.annotation)
    return set(_fields(model)) if model is not None else set()


def _fields(model: type[BaseModel]) -> dict[str, FieldInfo]:
    return {info.alias or name: info for name, info in model.model_fields.items()}


def _model_in(annotation: object) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for argument in get_args(annotation):
        found = _model_in(argument)
        if found is not None:
            return found
    return None


def _detail(kind: str, message: str, value: object, ctx: dict[str, Any]) -> str:
    if kind == ERROR_TYPE:
        return str(ctx.get("detail", message))
    got = describe(value)
    if kind in _MAPPING_ERRORS:
        return f"expected a mapping, got {got}"
    if kind in _LIST_ERRORS:
        return f"expected a list, got {got}"
    if kind == "string_type":
        return f"expected a string, got {got}"
    if kind == "int_type":
        return f"expected an integer, got {got}"
    if kind == "bool_type":
        return f"expected true or false, got {got}"
    if kind in ("literal_error", "enum"):
        shown = quoted(value) if isinstance(value, str) else got
        return f"expected {ctx.get('expected', 'one of the allowed values')}, got {shown}"
    if kind == "value_error" and "error" in ctx:
        return str(ctx["error"])
    return message

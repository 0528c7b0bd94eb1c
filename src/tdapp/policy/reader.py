"""Reading session YAML into plain data that remembers where every value came from.

Owns the YAML layer: PyYAML's safe composer (never its constructors), the
scalar rules, and the limits that keep a hostile document cheap to refuse. It
must never build a Python object a document asks for by tag, follow an alias,
or let a duplicate key silently win, and it raises nothing but
:class:`SessionError`.

Scalars follow YAML 1.2's core schema, as SCONE's own parser does: ``yes``
and ``2018-07-13`` are strings, ``true``, ``7`` and ``0.3`` are not. A plain
scalar that reads as a boolean or a number becomes a :class:`Plain`, which
keeps its text, because the session language decides per key what it needs:
``version: 0.3`` and ``PIN: 0042`` want the text, ``isvprodid: 22`` the number.
"""

from __future__ import annotations

import math
import re
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Literal

import yaml
from yaml.events import AliasEvent, NodeEvent
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from tdapp.policy.errors import SessionError

MAX_CHARS = 1024 * 1024  # equal to the CAS's request limit, so a body it takes is parsed
MAX_NODES = 100_000
MAX_DEPTH = 48
# Longer integers are refused rather than parsed: Python's int() is quadratic
# in the number of digits and no session value is anywhere near this big.
MAX_INT_DIGITS = 40

Key = str | int
Path = tuple[Key, ...]

_STR = "tag:yaml.org,2002:str"
_NULL = "tag:yaml.org,2002:null"
_BOOL = "tag:yaml.org,2002:bool"
_INT = "tag:yaml.org,2002:int"
_FLOAT = "tag:yaml.org,2002:float"
_SEQ = "tag:yaml.org,2002:seq"
_MAP = "tag:yaml.org,2002:map"
# Explicit tags that only restate what the node already is; every other tag
# (!!python/..., !!binary, !!timestamp, !custom) is refused.
_HARMLESS_TAGS = frozenset({"!", _STR, _SEQ, _MAP})

CORE_SCHEMA: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    # (tag, pattern, possible first characters) of the YAML 1.2 core schema; "" is
    # the empty scalar, which is null.
    (_NULL, r"^(?:~|null|Null|NULL|)$", ("~", "n", "N", "")),
    (_BOOL, r"^(?:true|True|TRUE|false|False|FALSE)$", tuple("tTfF")),
    (_INT, r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$", tuple("-+0123456789")),
    (_FLOAT, r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
             r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$", tuple("-+.0123456789")),
)


@dataclass(frozen=True)
class Plain:
    """An unquoted scalar that YAML reads as a boolean or a number, with its text."""

    kind: Literal["bool", "int", "float"]
    text: str

    def number(self) -> bool | int | float:
        """The value YAML means; ``ValueError`` for an integer too long to be sensible."""
        if self.kind == "bool":
            return self.text.lower() == "true"
        if self.kind == "int":
            return _int_value(self.text)
        lowered = self.text.lower()
        if lowered.endswith(".nan"):
            return math.nan
        if lowered.endswith(".inf"):
            return -math.inf if lowered.startswith("-") else math.inf
        return float(self.text)


def _int_value(text: str) -> int:
    sign = -1 if text.startswith("-") else 1
    digits = text.lstrip("+-")
    if len(digits) > MAX_INT_DIGITS:
        raise ValueError("integer too large")
    if digits.startswith(("0x", "0o")):
        return sign * int(digits[2:], 16 if digits[1] == "x" else 8)
    return sign * int(digits, 10)


@dataclass
class Document:
    """The data of one YAML document and the 1-based line of each value and key."""

    data: object
    value_lines: dict[Path, int] = field(default_factory=dict)
    key_lines: dict[Path, int] = field(default_factory=dict)


class _Refused(Exception):
    def __init__(self, detail: str, mark: object, path: Path = ()) -> None:
        super().__init__(detail)
        self.detail = detail
        line = getattr(mark, "line", None)
        self.line = line + 1 if isinstance(line, int) else None
        self.path = path


class _SessionLoader(yaml.SafeLoader):
    """SafeLoader's scanner, parser and composer with limits and YAML 1.2 scalars."""

    # Replaces (does not extend) SafeLoader's YAML 1.1 resolvers.
    yaml_implicit_resolvers: dict[str | None, list[tuple[str, re.Pattern[str]]]] = {}  # noqa: RUF012

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._nodes = 0
        self._depth = 0

    def compose_node(self, parent: Node | None, index: Hashable) -> Node | None:
        event = self.peek_event()  # type: ignore[no-untyped-call]
        if isinstance(event, AliasEvent):
            raise _Refused("YAML aliases (*name) are not allowed in a session", event.start_mark)
        if isinstance(event, NodeEvent) and event.anchor is not None:
            raise _Refused("YAML anchors (&name) are not allowed in a session", event.start_mark)
        tag = getattr(event, "tag", None)
        if tag is not None and tag not in _HARMLESS_TAGS:
            raise _Refused(f"YAML tag {_short(tag)} is not allowed in a session",
                           event.start_mark)
        self._nodes += 1
        if self._nodes > MAX_NODES:
            raise _Refused(f"document has more than {MAX_NODES} values", event.start_mark)
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _Refused(f"document is nested more than {MAX_DEPTH} levels deep",
                               event.start_mark)
            return super().compose_node(parent, index)  # type: ignore[arg-type]
        finally:
            self._depth -= 1


for _tag, _pattern, _first in CORE_SCHEMA:
    _SessionLoader.add_implicit_resolver(_tag, re.compile(_pattern), list(_first))


def read_document(text: str, source: str) -> Document:
    """Compose ``text`` (one YAML document) into plain data, or raise SessionError."""
    if not isinstance(text, str):
        raise SessionError("expected the document as text", source=source)
    if len(text) > MAX_CHARS:
        raise SessionError(f"document is larger than {MAX_CHARS} characters", source=source)
    try:
        loader = _SessionLoader(text)
        try:
            root = loader.get_single_node()
        finally:
            loader.dispose()
    except _Refused as refused:
        raise SessionError(refused.detail, source=source, line=refused.line) from None
    except yaml.MarkedYAMLError as error:
        raise _yaml_error(error, source) from None
    except yaml.reader.ReaderError as error:  # carries a position, not a mark
        line = text.count("\n", 0, error.position) + 1
        code = error.character if isinstance(error.character, int) else 0
        raise SessionError(f"malformed YAML: character #x{code:04x} is not allowed "
                           "(control characters must be escaped)", source=source,
                           line=line) from None
    except yaml.YAMLError as error:
        raise SessionError(f"malformed YAML: {error}", source=source) from None
    if root is None:
        raise SessionError("document is empty (expected a session mapping)", source=source,
                           line=1)
    document = Document(data=None)
    try:
        document.data = _convert(root, (), document)
    except _Refused as refused:
        raise SessionError(refused.detail, source=source, line=refused.line,
                           path=format_path(refused.path)) from None
    return document


def _yaml_error(error: yaml.MarkedYAMLError, source: str) -> SessionError:
    mark = error.problem_mark or error.context_mark
    parts = [part for part in (error.context, error.problem) if part]
    detail = "; ".join(parts) if parts else "not valid YAML"
    return SessionError(f"malformed YAML: {detail}", source=source,
                        line=None if mark is None else mark.line + 1)


def _convert(node: Node, path: Path, document: Document) -> object:
    document.value_lines[path] = node.start_mark.line + 1
    if isinstance(node, ScalarNode):
        return _scalar(node, path)
    if isinstance(node, SequenceNode):
        return [_convert(item, (*path, index), document) for index, item in enumerate(node.value)]
    if isinstance(node, MappingNode):
        result: dict[str, object] = {}
        for key_node, value_node in node.value:
            key = _key(key_node, path)
            if key in result:
                first = document.key_lines[(*path, key)]
                raise _Refused(f"duplicate key {key!r} (first at line {first})",
                                   key_node.start_mark, path)
            document.key_lines[(*path, key)] = key_node.start_mark.line + 1
            result[key] = _convert(value_node, (*path, key), document)
        return result
    raise _Refused("unsupported YAML node", node.start_mark, path)


def _key(node: Node, path: Path) -> str:
    if not isinstance(node, ScalarNode):
        raise _Refused("a mapping key must be a plain string, not a list or mapping",
                           node.start_mark, path)
    # A key is its text: `1:` or `true:` name the keys "1" and "true".
    return _checked_text(node, path)


def _scalar(node: ScalarNode, path: Path) -> object:
    if node.tag == _STR:
        return _checked_text(node, path)
    if node.tag == _NULL:
        return None
    if node.tag == _BOOL:
        return Plain("bool", node.value)
    if node.tag == _INT:
        return Plain("int", node.value)
    if node.tag == _FLOAT:
        return Plain("float", node.value)
    raise _Refused(f"YAML tag {_short(node.tag)} is not allowed in a session",
                   node.start_mark, path)


def _short(tag: str) -> str:
    prefix = "tag:yaml.org,2002:"
    return "!!" + tag[len(prefix):] if tag.startswith(prefix) else tag


def _checked_text(node: ScalarNode, path: Path) -> str:
    value: str = node.value
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        # "\ud800" escapes give lone surrogates: not text, and not encodable for hashing.
        raise _Refused("value is not valid Unicode (lone surrogate escape)",
                           node.start_mark, path) from None
    return value


def format_path(path: Path) -> str:
    """``("services", 0, "environment")`` -> ``services[0].environment``."""
    text = ""
    for key in path:
        if isinstance(key, int):
            text += f"[{key}]"
        else:
            text += f".{key}" if text else key
    return text

"""An image's manifest: its name, its measured settings, its files, as ``manifest.json``.

Owns the rules for every value a manifest may hold (names, sizes, modes, paths,
the entrypoint) and the manifest's JSON form (docs/measurement.md). Values are
checked whether they come from the command line (:class:`UsageError`) or from
a stored or imported manifest (:class:`IntegrityError`). This module must never
touch the file system, nor accept a value it has not checked.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from tdapp.errors import IntegrityError, TdappError, UsageError
from tdapp.policy import split_command

MANIFEST_FORMAT = 2
MODES = ("sim", "hardware")
DEFAULT_HEAP = 40 * 1024 * 1024
DEFAULT_STACK = 4 * 1024 * 1024
HEAP_RANGE = (1024 * 1024, 64 * 1024**3)
STACK_RANGE = (64 * 1024, 1024**3)
MAX_SIZE = 2**63 - 1

_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_SIZE = re.compile(r"([0-9]{1,19})([KMG]?)", re.IGNORECASE)
_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
_SHA256 = re.compile(r"[0-9a-f]{64}")
_FILE_MODE = re.compile(r"[0-7]{4}")

ErrorKind = type[TdappError]


@dataclass(frozen=True)
class FileRecord:
    """One file of an image: where it sits under the image root and what it holds."""

    path: str
    mode: int
    size: int
    sha256: str


@dataclass(frozen=True)
class DirRecord:
    """A folder of an image, recorded with its mode (an empty one matters too)."""

    path: str
    mode: int


@dataclass(frozen=True)
class LinkRecord:
    """A symbolic link of an image; it resolves inside the image, whose root is ``/``."""

    path: str
    target: str


@dataclass(frozen=True)
class Source:
    """Where an image taken from a container image came from, and its config's defaults
    for the session template (recorded, not measured)."""

    reference: str
    digest: str
    env: tuple[str, ...] = ()
    working_dir: str = "/"


@dataclass(frozen=True)
class Config:
    """Everything measured besides the tree."""

    entrypoint: tuple[str, ...]
    heap: int
    stack: int
    mode: str
    host_paths: tuple[str, ...]
    user: str = ""


@dataclass(frozen=True)
class Manifest:
    name: str
    config: Config
    files: tuple[FileRecord, ...]
    measurement: str
    created: str
    dirs: tuple[DirRecord, ...] = ()
    links: tuple[LinkRecord, ...] = ()
    source: Source | None = None

    def to_json(self) -> bytes:
        document = {
            "format": MANIFEST_FORMAT,
            "name": self.name,
            "entrypoint": list(self.config.entrypoint),
            "heap": self.config.heap,
            "stack": self.config.stack,
            "mode": self.config.mode,
            "host_paths": list(self.config.host_paths),
            "user": self.config.user,
            "files": {record.path: {"sha256": record.sha256, "size": record.size,
                                    "mode": f"{record.mode:04o}"} for record in self.files},
            "dirs": {record.path: f"{record.mode:04o}" for record in self.dirs},
            "links": {record.path: record.target for record in self.links},
            "source": None if self.source is None else {
                "reference": self.source.reference, "digest": self.source.digest,
                "env": list(self.source.env), "working_dir": self.source.working_dir},
            "measurement": self.measurement,
            "created": self.created,
        }
        return (json.dumps(document, indent=2, ensure_ascii=False) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes, where: str) -> Manifest:
        """Parse and check a manifest; every problem is an :class:`IntegrityError`."""
        try:
            document = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as error:
            raise IntegrityError(f"{where}: manifest.json is not valid JSON ({error})") from None
        if not isinstance(document, dict):
            raise IntegrityError(f"{where}: manifest.json is not a JSON object")
        try:
            return _from_document(document)
        except IntegrityError as error:
            raise IntegrityError(f"{where}: invalid manifest.json: {error}") from None


def _from_document(document: dict[str, Any]) -> Manifest:
    expected = {"format", "name", "entrypoint", "heap", "stack", "mode", "host_paths", "user",
                "files", "dirs", "links", "source", "measurement", "created"}
    unknown = sorted(set(document) - expected)
    if unknown:
        raise IntegrityError(f"unknown key {unknown[0]!r}")
    missing = sorted(expected - set(document))
    if missing:
        raise IntegrityError(f"missing key {missing[0]!r}")
    if document["format"] != MANIFEST_FORMAT:
        raise IntegrityError(f"unsupported format {document['format']!r} "
                             f"(this tdapp reads format {MANIFEST_FORMAT}; rebuild or re-import "
                             "the image)")
    entrypoint = _strings(document["entrypoint"], "entrypoint")
    config = Config(
        entrypoint=check_entrypoint(entrypoint, IntegrityError),
        heap=check_limit(_integer(document["heap"], "heap"), "heap", HEAP_RANGE, IntegrityError),
        stack=check_limit(_integer(document["stack"], "stack"), "stack", STACK_RANGE,
                          IntegrityError),
        mode=check_mode(_string(document["mode"], "mode"), IntegrityError),
        host_paths=check_host_paths(_strings(document["host_paths"], "host_paths"),
                                    IntegrityError),
        user=check_user(_string(document["user"], "user"), IntegrityError),
    )
    records = tuple(_file_record(path, value)
                    for path, value in sorted(_object(document["files"], "files").items()))
    dirs = tuple(DirRecord(check_image_path(path, IntegrityError), _mode(value, path, "dirs"))
                 for path, value in sorted(_object(document["dirs"], "dirs").items()))
    links = tuple(LinkRecord(path, check_link_target(path, _string(target, "link target"),
                                                     IntegrityError))
                  for path, target in sorted(_object(document["links"], "links").items()))
    measurement = _string(document["measurement"], "measurement")
    if not _SHA256.fullmatch(measurement):
        raise IntegrityError("measurement is not 64 lowercase hex characters")
    return Manifest(check_name(_string(document["name"], "name"), IntegrityError), config,
                    records, measurement, _string(document["created"], "created"), dirs, links,
                    _source(document["source"]))


def _object(value: object, key: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise IntegrityError(f"{key} is not an object")
    return value


def _mode(value: object, path: str, key: str) -> int:
    mode = _string(value, f"{key}[{path!r}]")
    if not _FILE_MODE.fullmatch(mode):
        raise IntegrityError(f"{key}[{path!r}] is not 4 octal digits")
    return int(mode, 8)


def _source(value: object) -> Source | None:
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) != {"reference", "digest", "env",
                                                     "working_dir"}:
        raise IntegrityError("source must be null or hold exactly reference, digest, env and "
                             "working_dir")
    digest = _string(value["digest"], "source.digest")
    if not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
        raise IntegrityError("source.digest is not sha256:<64 hex>")
    return Source(_string(value["reference"], "source.reference"), digest,
                  _strings(value["env"], "source.env"),
                  _string(value["working_dir"], "source.working_dir"))


def _file_record(path: str, value: object) -> FileRecord:
    check_image_path(path, IntegrityError)
    if not isinstance(value, dict) or set(value) != {"sha256", "size", "mode"}:
        raise IntegrityError(f"files[{path!r}] must hold exactly sha256, size and mode")
    digest = _string(value["sha256"], "sha256")
    if not _SHA256.fullmatch(digest):
        raise IntegrityError(f"files[{path!r}].sha256 is not 64 lowercase hex characters")
    size = _integer(value["size"], "size")
    if not 0 <= size <= MAX_SIZE:
        raise IntegrityError(f"files[{path!r}].size is out of range")
    return FileRecord(path, _mode(value["mode"], path, "files"), size, digest)


def _string(value: object, key: str) -> str:
    if not isinstance(value, str):
        raise IntegrityError(f"{key} is not a string")
    return value


def _strings(value: object, key: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise IntegrityError(f"{key} is not a list of strings")
    return tuple(value)


def _integer(value: object, key: str) -> int:
    # bool is an int in Python, but `true` is no size.
    if not isinstance(value, int) or isinstance(value, bool):
        raise IntegrityError(f"{key} is not an integer")
    return value


# -- value rules -----------------------------------------------------------------------------


def check_name(name: str, error: ErrorKind = UsageError) -> str:
    if not _NAME.fullmatch(name):
        raise error(f"image name {name!r} is not valid: use 1 to 64 characters from a-z 0-9 . _ -,"
                    " starting with a letter or digit")
    return name


def check_mode(mode: str, error: ErrorKind = UsageError) -> str:
    if mode not in MODES:
        raise error(f"mode {mode!r} is not one of {', '.join(MODES)}")
    return mode


def parse_size(text: str, what: str) -> int:
    """``40M`` → 41943040: bytes, or K, M, G in binary units as SCONE_HEAP reads them."""
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise UsageError(f"--{what} {text!r} is not a size (write bytes, or a number with "
                         "K, M or G, like 40M)")
    return int(match.group(1)) * _UNITS[match.group(2).lower()]


def check_limit(value: int, what: str, bounds: tuple[int, int],
                error: ErrorKind = UsageError) -> int:
    low, high = bounds
    if not low <= value <= high:
        raise error(f"{what} limit {value} bytes is outside {_human(low)} to {_human(high)}")
    return value


def _human(size: int) -> str:
    for unit, factor in (("G", 1024**3), ("M", 1024**2), ("K", 1024)):
        if size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)


def check_image_path(path: str, error: ErrorKind) -> str:
    """A file's place under the image root: relative, canonical, UTF-8, no ``..``."""
    if not path or path.startswith("/") or path.endswith("/"):
        raise error(f"image path {path!r} is not a relative file path")
    for part in path.split("/"):
        if part in ("", ".", ".."):
            raise error(f"image path {path!r} has a {part!r} component")
        if "\x00" in part or "\n" in part:
            raise error(f"image path {path!r} contains a NUL or line break")
        try:
            part.encode("utf-8")
        except UnicodeEncodeError:
            raise error(f"image path {path!r} is not valid UTF-8") from None
    return path


def check_link_target(path: str, target: str, error: ErrorKind) -> str:
    """A symbolic link's target, refused if it would lead out of the image's root.

    An absolute target is taken from the image's root (the program's ``/``); a
    relative one from the link's folder. Climbing above the root with ``..`` is
    refused either way, so no link means anything outside the image, even to a tool
    on the host that resolved it lexically.
    """
    check_image_path(path, error)
    if not target or "\x00" in target or len(target) > 4096:
        raise error(f"symbolic link {path!r} has an empty, NUL-holding or over-long target")
    if climbs_above_root(path.count("/"), target):
        raise error(f"symbolic link {path!r} -> {target!r} leads out of the image root")
    return target


def climbs_above_root(folder_depth: int, target: str) -> bool:
    """Whether a link ``folder_depth`` folders below the root, to ``target``, climbs above it."""
    depth = 0 if target.startswith("/") else folder_depth
    for part in target.split("/"):
        if part == "..":
            depth -= 1
            if depth < 0:
                return True
        elif part not in ("", "."):
            depth += 1
    return False


_USER = re.compile(r"[A-Za-z0-9_.][A-Za-z0-9_.-]{0,31}(:[A-Za-z0-9_.][A-Za-z0-9_.-]{0,31})?")


def check_user(user: str, error: ErrorKind = UsageError) -> str:
    """The user the program runs as: empty, or USER[:GROUP] by name or number."""
    if user and not _USER.fullmatch(user):
        raise error(f"user {user!r} is not USER[:GROUP] (names or numbers)")
    return user


def check_host_paths(paths: Iterable[str], error: ErrorKind = UsageError) -> tuple[str, ...]:
    """Absolute host paths (``*``, ``?`` and ``[…]`` allowed), deduplicated and sorted."""
    checked: set[str] = set()
    for path in paths:
        trimmed = path.rstrip("/") if path != "/" else path
        if not trimmed.startswith("/"):
            raise error(f"host path {path!r} is not absolute")
        if trimmed == "/":
            raise error("host path / would give the program the whole host file system")
        parts = trimmed.split("/")[1:]
        if any(part in ("", ".", "..") for part in parts):
            raise error(f"host path {path!r} has an empty, '.' or '..' component")
        if any(char in trimmed for char in "\x00\n$"):
            raise error(f"host path {path!r} contains a NUL, a line break or '$'")
        checked.add(trimmed)
    # Sorted: the set of paths is what counts, not the order they were given in.
    return tuple(sorted(checked))


def parse_entrypoint(command: str) -> tuple[str, ...]:
    """Split a command the way the session's ``command`` is split (SCONE's rules)."""
    try:
        words = split_command(command)
    except ValueError as error:
        raise UsageError(f"--entrypoint: {error}") from None
    return check_entrypoint(words, UsageError)


def check_entrypoint(argv: Iterable[str], error: ErrorKind = UsageError) -> tuple[str, ...]:
    words = tuple(argv)
    if not words or not words[0]:
        raise error("the entrypoint names no program")
    if not words[0].startswith("/"):
        raise error(f"the entrypoint's program {words[0]!r} must be an absolute path "
                    "(in the image, like /copy_files, or under a host path)")
    for word in words:
        # '$' would be taken for a template variable in the session's command.
        if "$" in word or "\x00" in word or "\n" in word or "\r" in word:
            raise error(f"entrypoint argument {word!r} contains '$', a NUL or a line break")
        if "'" in word and '"' in word:
            raise error(f"entrypoint argument {word!r} holds both quote characters; a session "
                        "command cannot express it")
    return words


def join_command(argv: Iterable[str]) -> str:
    """The session ``command`` string that :func:`split_command` splits back into ``argv``."""
    pieces = []
    for word in argv:
        if word and not any(char.isspace() or char in "'\"" for char in word):
            pieces.append(word)
        else:
            quote = '"' if "'" in word else "'"
            pieces.append(f"{quote}{word}{quote}")
    return " ".join(pieces)

"""Path rules for files inside a volume.

Inside a volume every path is relative, uses ``/``, and has no empty, ``.`` or
``..`` component, so that no stored name can ever point outside the folder it is
extracted into. No name may hold a control character (newline included), a line
or paragraph separator, or a bidirectional control (U+202A..U+202E,
U+2066..U+2069 and the marks U+061C, U+200E, U+200F): such names forge lines in
listings and logs, or show one name as another. A path is at most
:data:`MAX_PATH_BYTES` bytes and :data:`MAX_PATH_DEPTH` components, so every
operation on a tree stays within the system's and Python's limits. This
module also decides when files and folders of one tree clash. It must never
touch the file system.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from tdapp.errors import InputError, UsageError

MAX_COMPONENT_BYTES = 255
MAX_PATH_BYTES = 4095  # what Linux can name in one call (PATH_MAX less the NUL)
MAX_PATH_DEPTH = 255  # components; walking, merging and removing a tree stay shallow

# C0 and C1 controls (NUL, newline, escape …), line and paragraph separators, and
# every character with the Unicode Bidi_Control property.
_FORBIDDEN = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u061c\u200e\u200f"
                        "\u202a-\u202e\u2066-\u2069]")


def escape_path(path: str) -> str:
    """``path`` with every unprintable character escaped, for one-line messages."""
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in path)


def normalize_relative(path: str, *, allow_root: bool = False) -> str:
    """Turn a user-given path (``/a/b``, ``a/b/``) into the canonical ``a/b``."""
    parts = [part for part in path.split("/") if part not in ("", ".")]
    if not parts and not allow_root:
        raise UsageError(f"path {path!r} names the volume root, not a file")
    for part in parts:
        _check_component(part, path, UsageError)
    normalized = "/".join(parts)
    _check_length(normalized, path, UsageError)
    return normalized


def check_name(name: str, directory: str) -> str:
    """Validate one file name read from the host's file system."""
    _check_component(name, f"{directory}/{name}", InputError)
    return name


def check_relative(relative: str, where: str) -> str:
    """Validate the volume path a file found at ``where`` on the host would get."""
    _check_length(relative, where, InputError)
    return relative


def check_stored_path(path: str) -> str:
    """Validate a path read from a volume's FSPF: it must already be canonical."""
    if not path or path.startswith("/") or path.endswith("/"):
        raise InputError(f"volume lists an invalid path {path!r}")
    for part in path.split("/"):
        _check_component(part, path, InputError)
    _check_length(path, path, InputError)
    return path


def _check_component(part: str, whole: str, error: type[UsageError] | type[InputError]) -> None:
    if part in ("", ".", ".."):
        raise error(f"path {whole!r} has a {part!r} component")
    if "\x00" in part:
        raise error(f"path {whole!r} contains a NUL byte")
    forbidden = _FORBIDDEN.search(part)
    if forbidden is not None:
        raise error(f"path {whole!r} contains the control character "
                    f"U+{ord(forbidden.group()):04X}, not allowed in a volume")
    try:
        encoded = part.encode("utf-8")
    except UnicodeEncodeError:
        raise error(f"path {whole!r} is not valid UTF-8") from None
    if len(encoded) > MAX_COMPONENT_BYTES:
        raise error(f"path {whole!r} has a component longer than {MAX_COMPONENT_BYTES} bytes")


def _check_length(path: str, whole: str, error: type[UsageError] | type[InputError]) -> None:
    # Counted in characters first: a path short in characters is short in bytes.
    if len(path) > MAX_PATH_BYTES // 4 and len(path.encode("utf-8", "surrogatepass")) \
            > MAX_PATH_BYTES:
        raise error(f"path {escape_path(whole)[:80]}… is longer than {MAX_PATH_BYTES} bytes")
    if path.count("/") >= MAX_PATH_DEPTH:
        raise error(f"path {escape_path(whole)[:80]}… has more than {MAX_PATH_DEPTH} "
                    "components")


def find_clash(files: Iterable[str], folders: Iterable[str]) -> str | None:
    """A path that would be both a file and a folder (a folder or a file's parent), if any."""
    file_set = set(files)
    folder_set = set(folders)
    for path in (*file_set, *folder_set):
        parent = path.rpartition("/")[0]
        while parent and parent not in folder_set:
            folder_set.add(parent)
            parent = parent.rpartition("/")[0]
    clash = sorted(file_set & folder_set)
    return clash[0] if clash else None

"""Path rules for files inside a volume.

Inside a volume every path is relative, uses ``/``, and has no empty, ``.`` or
``..`` component, so that no stored name can ever point outside the folder it is
extracted into. This module must never touch the file system.
"""

from __future__ import annotations

from tdapp.errors import InputError, UsageError

MAX_COMPONENT_BYTES = 255


def normalize_relative(path: str, *, allow_root: bool = False) -> str:
    """Turn a user-given path (``/a/b``, ``a/b/``) into the canonical ``a/b``."""
    parts = [part for part in path.split("/") if part not in ("", ".")]
    if not parts and not allow_root:
        raise UsageError(f"path {path!r} names the volume root, not a file")
    for part in parts:
        _check_component(part, path, UsageError)
    return "/".join(parts)


def check_name(name: str, directory: str) -> str:
    """Validate one file name read from the host's file system."""
    _check_component(name, f"{directory}/{name}", InputError)
    return name


def check_stored_path(path: str) -> str:
    """Validate a path read from a volume's FSPF: it must already be canonical."""
    if not path or path.startswith("/") or path.endswith("/"):
        raise InputError(f"volume lists an invalid path {path!r}")
    for part in path.split("/"):
        _check_component(part, path, InputError)
    return path


def _check_component(part: str, whole: str, error: type[UsageError] | type[InputError]) -> None:
    if part in ("", ".", ".."):
        raise error(f"path {whole!r} has a {part!r} component")
    if "\x00" in part:
        raise error(f"path {whole!r} contains a NUL byte")
    try:
        encoded = part.encode("utf-8")
    except UnicodeEncodeError:
        raise error(f"path {whole!r} is not valid UTF-8") from None
    if len(encoded) > MAX_COMPONENT_BYTES:
        raise error(f"path {whole!r} has a component longer than {MAX_COMPONENT_BYTES} bytes")

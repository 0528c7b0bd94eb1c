"""The host's library folders a dynamically linked program of an image needs.

:func:`default_host_paths_for` returns them for :mod:`tdapp.runtime.sandbox`
to bind read-only when an image has a dynamically linked ELF file and no libc
or loader of its own. Those host files are **not** part of the image's
measurement: an image relying on them trusts the host's libc. This module only
reads files; it must never decide that a host path is measured.
"""

from __future__ import annotations

import glob
import os
import re
import struct
from collections.abc import Sequence
from pathlib import Path

_HOST_LIB_DIRS = ("/lib", "/lib64", "/usr/lib", "/usr/lib64")
_OWN_LIBC = re.compile(r"^(libc\.so(\..*)?|libc\.musl.*|ld-linux.*\.so.*|ld-musl.*\.so.*)$")
_PT_INTERP = 3


def _is_dynamic_elf(path: Path) -> bool:
    """Whether ``path`` is an ELF file with a program interpreter (dynamically linked)."""
    try:
        with path.open("rb") as f:
            head = f.read(64)
            if len(head) < 52 or head[:4] != b"\x7fELF":
                return False
            is64, endian = head[4] == 2, "<" if head[5] == 1 else ">"
            if is64:
                phoff, = struct.unpack_from(endian + "Q", head, 32)
                phentsize, phnum = struct.unpack_from(endian + "HH", head, 54)
            else:
                phoff, = struct.unpack_from(endian + "I", head, 28)
                phentsize, phnum = struct.unpack_from(endian + "HH", head, 42)
            if phentsize < 4 or phnum > 4096:
                return False
            f.seek(phoff)
            table = f.read(phentsize * phnum)
    except OSError:
        return False
    for i in range(len(table) // phentsize):
        (p_type,) = struct.unpack_from(endian + "I", table, i * phentsize)
        if p_type == _PT_INTERP:
            return True
    return False


def default_host_paths_for(root: Path, host_paths: Sequence[str] = ()) -> list[str]:
    """The host library folders a dynamically linked ELF program of this image needs.

    Empty if the image has no dynamically linked ELF file or ships its own libc or
    loader. A host program the image names (an interpreter) is dynamically linked
    against the host's libc, so it brings the same folders. These host files are
    not measured (see the module docstring).
    """
    dynamic = any(_is_dynamic_elf(Path(p)) for pattern in host_paths
                  for p in glob.glob(pattern) if Path(p).is_file())
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            if _OWN_LIBC.match(name):
                return []
            p = Path(dirpath) / name
            if not dynamic and not p.is_symlink() and p.is_file() and _is_dynamic_elf(p):
                dynamic = True
    if not dynamic:
        return []
    return [d for d in _HOST_LIB_DIRS if os.path.exists(d)]

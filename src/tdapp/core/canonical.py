"""Canonical JSON: the one byte form tdapp hashes, signs, seals or compares.

Sorted keys, no whitespace, UTF-8 (``ensure_ascii=False``, so a name is hashed as
the characters it holds, not as escapes), and no NaN or infinity (they are not
JSON). Session hashes, report_data bindings, sim evidence and the FSPF all use
this function; a second encoder that differs in any of these would make two
parts disagree about the same document.
"""

from __future__ import annotations

import json
from typing import Any


def canonical_json(value: Any) -> bytes:
    """Deterministic JSON bytes of ``value``: sorted keys, compact, UTF-8, finite numbers."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")

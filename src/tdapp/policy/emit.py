"""Writing a normalized session back as YAML that reads back to the same session.

Owns the one rule that makes ``to_yaml`` round-trip: a string is written
plainly only if neither YAML 1.1 (what PyYAML and most tools read) nor YAML
1.2 (what :mod:`tdapp.policy.reader` reads) would take it for a number, a
boolean or null; otherwise it is quoted. It must never write anything a
session reader would read differently (no aliases, no tags).
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from tdapp.policy.reader import CORE_SCHEMA


class _SessionDumper(yaml.SafeDumper):
    """SafeDumper that also quotes strings YAML 1.2 would read as non-strings."""

    def ignore_aliases(self, data: Any) -> bool:
        return True  # equal values are written out each time, never as &anchor/*alias


for _tag, _pattern, _first in CORE_SCHEMA:
    _SessionDumper.add_implicit_resolver(_tag, re.compile(_pattern), list(_first))


def _text(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    # Multi-line text (certificates, injected files) reads best as a literal block.
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_SessionDumper.add_representer(str, _text)


def dump_yaml(content: dict[str, Any]) -> str:
    """YAML text for JSON-like ``content``, keys in the order given."""
    return yaml.dump(content, Dumper=_SessionDumper, sort_keys=False, allow_unicode=True,
                     default_flow_style=False, width=100)

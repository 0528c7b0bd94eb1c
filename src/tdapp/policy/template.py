"""Session templates: filling ``$NAME`` and ``${NAME}`` before a session is parsed.

A template (such as the one ``tdapp build`` writes) is session YAML with
variables the client fills: ``$SESSION``, ``$INPUT_FSPF_KEY`` and so on.
``$$`` and so every ``$$SCONE::name$$`` placeholder belong to the session
language and pass through untouched. Filling is textual, like SCONE's CLI,
so variables in comments count too. This module must never leave a variable
unfilled without saying so, nor insert a value that would change the
document's structure (a line break) instead of one value.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from tdapp.errors import UsageError

# The platform id of the LAS a sim template accepts, filled by the client from its LAS.
LAS_PLATFORM_VARIABLE = "LAS_PLATFORM"
# One token at a time: `$$` (kept), `${NAME}`, `$NAME`, or a malformed `${`.
_TOKEN = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)|\$\{")


def template_variables(text: str) -> set[str]:
    """The names of the ``$VARIABLES`` a template uses (not ``$$`` placeholders)."""
    names: set[str] = set()
    for match in _TOKEN.finditer(text):
        name = match.group(1) or match.group(2)
        if name:
            names.add(name)
    return names


def fill_template(text: str, variables: Mapping[str, str]) -> str:
    """``text`` with every ``$NAME`` / ``${NAME}`` replaced by ``variables[NAME]``."""
    missing: list[str] = []
    pieces: list[str] = []
    position = 0
    for match in _TOKEN.finditer(text):
        pieces.append(text[position:match.start()])
        position = match.end()
        name = match.group(1) or match.group(2)
        if match.group(0) == "$$":
            pieces.append("$$")
        elif name is None:
            line = text.count("\n", 0, match.start()) + 1
            raise UsageError(f"malformed template variable at line {line}: '${{' must be "
                             "followed by a name and '}' (write $$ for a literal $$)")
        elif name not in variables:
            if name not in missing:
                missing.append(name)
        else:
            pieces.append(_checked(name, variables[name]))
    if missing:
        first = missing[0]
        more = f"; also not set: {', '.join('$' + name for name in missing[1:])}" if len(
            missing) > 1 else ""
        raise UsageError(f"template variable ${first} is not set (give -e {first}=VALUE)"
                         + more)
    pieces.append(text[position:])
    return "".join(pieces)


def _checked(name: str, value: str) -> str:
    if not isinstance(value, str):
        raise UsageError(f"template variable ${name} must be text")
    if any(char in value for char in "\n\r\x00"):
        # The value is pasted into YAML text: a line break would add structure.
        raise UsageError(f"template variable ${name} contains a line break or NUL; values "
                         "are inserted into one YAML line")
    return value

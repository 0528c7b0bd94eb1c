"""Where an address a command uses came from, so a failure to reach it can say so.

:func:`tdapp.client.announce.announced` notes the origin of each address it
hands out (a flag, an environment variable, ``tdapp up``'s ``up.json``, the one
pinned CAS, or the default); the clients that cannot reach an address append
:func:`origin_of` to their one-line error. It holds addresses and descriptions
only, never a secret, and decides nothing.
"""

from __future__ import annotations

_NOTED: dict[str, str] = {}


def note_origin(address: str, origin: str) -> str:
    """Remember that ``address`` came from ``origin`` (a phrase: "from --cas"); returns it."""
    _NOTED[address.strip()] = origin
    return address


def origin_of(address: object) -> str:
    """`` (ORIGIN)`` for an address noted before, else the empty string."""
    origin = _NOTED.get(str(address).strip())
    return f" ({origin})" if origin else ""

"""Where this user's services are: what ``tdapp up`` announced, else the defaults.

``tdapp up`` writes ``$TDAPP_HOME/up.json`` with the addresses it serves;
commands that need a CAS, LAS or transfer service read it when no flag or
environment variable names one.
"""

from __future__ import annotations

import contextlib
import json
import os

from tdapp.home import tdapp_home
from tdapp.volume.layout import write_atomically

DEFAULTS = {"cas": "127.0.0.1:8081", "las": "127.0.0.1:18766",
            "push": "http://127.0.0.1:8090/upload"}
_ENVIRONMENT = {"cas": "TDAPP_CAS", "las": "TDAPP_LAS", "push": "TDAPP_PUSH"}


def announced(service: str) -> str:
    """The address of ``service`` (cas, las or push) for this user."""
    from_environment = os.environ.get(_ENVIRONMENT[service])
    if from_environment:
        return from_environment
    try:
        recorded = json.loads((tdapp_home() / "up.json").read_text())
        value = recorded.get(service)
        if isinstance(value, str) and value:
            return value
    except (OSError, ValueError, AttributeError):
        pass
    return DEFAULTS[service]


def announce(addresses: dict[str, str]) -> None:
    tdapp_home().mkdir(mode=0o700, parents=True, exist_ok=True)
    write_atomically(tdapp_home() / "up.json", json.dumps(addresses).encode())


def withdraw() -> None:
    with contextlib.suppress(FileNotFoundError):
        (tdapp_home() / "up.json").unlink()

"""Where this user's services are: what ``tdapp up`` announced, else the defaults.

``tdapp up`` writes ``$TDAPP_HOME/up.json`` with the addresses it serves, its
pid and a random owner token; commands that need a CAS, LAS or transfer
service read it when no flag or environment variable names one. Only the
process whose token is in the file may remove it, so a ``tdapp up`` that
stops never withdraws another one's announcement.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from tdapp.core.address import Address
from tdapp.core.atomic import write_atomically
from tdapp.core.origin import note_origin
from tdapp.errors import TdappError
from tdapp.home import tdapp_home

UP_FILE = "up.json"
DEFAULTS = {"cas": "127.0.0.1:8081", "las": "127.0.0.1:18766",
            "push": "http://127.0.0.1:8090/upload", "broker": "redis://127.0.0.1:6379/0"}
_ENVIRONMENT = {"cas": "TDAPP_CAS", "las": "TDAPP_LAS", "push": "TDAPP_PUSH",
                "broker": "TDAPP_BROKER"}


@dataclass(frozen=True)
class Announcement:
    """The proof that this process wrote ``up.json``: the token inside it."""

    owner: str


def announced(service: str, given: str | None = None, flag: str | None = None) -> str:
    """The address of ``service`` (cas, las, push or broker) for this user: ``given`` (the
    value of ``flag``) if any, else the environment, ``up.json``, the one pinned CAS, the
    default. Its origin is noted (:mod:`tdapp.core.origin`) for a "cannot reach" error."""
    if given:
        return _noted(given, f"from {flag}" if flag else "given on the command line")
    variable = _ENVIRONMENT[service]
    from_environment = os.environ.get(variable)
    if from_environment:
        return _noted(from_environment, f"from ${variable}")
    recorded = _read_up_file()
    value = recorded.get(service) if recorded is not None else None
    if isinstance(value, str) and value:
        return _noted(value, f"announced by tdapp up in {tdapp_home() / UP_FILE}")
    if service == "cas":
        pinned = _only_pinned_cas()
        if pinned is not None:
            return _noted(pinned, f"the only CAS pinned in {tdapp_home() / 'pins'}")
    return _noted(DEFAULTS[service], f"the default: no {flag + ', ' if flag else ''}"
                                     f"${variable} or running tdapp up")


def _noted(address: str, origin: str) -> str:
    note_origin(address, origin)
    if "://" not in address:  # HOST:PORT: also as the client will print it
        with contextlib.suppress(TdappError):
            note_origin(str(Address.parse(address)), origin)
    return address


def announced_state(service: str) -> Path | None:
    """The state folder of ``service`` that this user's ``tdapp up`` announced, if any."""
    recorded = _read_up_file()
    value = recorded.get(f"{service}_state") if recorded is not None else None
    return Path(value) if isinstance(value, str) and value else None


def _only_pinned_cas() -> str | None:
    """The CAS this user pinned, when it pinned exactly one (a second user of a CAS that
    another user's tdapp up runs has no up.json, but has pinned that CAS)."""
    folder = tdapp_home() / "pins"
    try:
        names = [path.name for path in folder.glob("*.crt")]
    except OSError:
        return None
    if len(names) != 1:
        return None
    host, _, port = names[0].removesuffix(".crt").rpartition("_")
    # IPv6 pins lose their brackets in the file name: only name-or-IPv4 pins are read back.
    if not host or ":" in host or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    return f"{host}:{port}"


def announce(addresses: dict[str, str]) -> Announcement:
    """Write ``up.json`` for these addresses; the result is needed to withdraw it."""
    tdapp_home().mkdir(mode=0o700, parents=True, exist_ok=True)
    announcement = Announcement(secrets.token_hex(16))
    document = {**addresses, "pid": os.getpid(), "owner": announcement.owner}
    write_atomically(tdapp_home() / UP_FILE, json.dumps(document).encode())
    return announcement


def withdraw(announcement: Announcement) -> None:
    """Remove ``up.json`` if, and only if, it is still the one ``announcement`` wrote."""
    recorded = _read_up_file()
    owner = recorded.get("owner") if recorded is not None else None
    if not isinstance(owner, str) or not hmac.compare_digest(
            owner.encode(), announcement.owner.encode()):
        return
    with contextlib.suppress(FileNotFoundError):
        (tdapp_home() / UP_FILE).unlink()


def _read_up_file() -> dict[str, object] | None:
    try:
        recorded = json.loads((tdapp_home() / UP_FILE).read_bytes())
    except (OSError, ValueError, RecursionError):
        return None
    return recorded if isinstance(recorded, dict) else None

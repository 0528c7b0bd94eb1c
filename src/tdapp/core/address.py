"""Network addresses: ``HOST:PORT`` as users type them, parsed once.

One type for the CAS, the LAS, the transfer service and every client, so an
address means the same everywhere (IPv6 in brackets, a default port, a clear
:class:`~tdapp.errors.UsageError` for anything else).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from tdapp.errors import UsageError


@dataclass(frozen=True)
class Address:
    host: str
    port: int

    @classmethod
    def parse(cls, text: str, default_port: int = 8081) -> Address:
        value = text.strip()
        for prefix in ("https://", "http://"):
            value = value.removeprefix(prefix)
        value = value.rstrip("/")
        if value.startswith("["):
            host, _, rest = value[1:].partition("]")
            port_text = rest.removeprefix(":")
        elif value.count(":") == 1:
            host, _, port_text = value.partition(":")
        else:
            host, port_text = value, ""
        if not host:
            raise UsageError(f"address {text!r} has no host; expected HOST:PORT")
        try:
            port = int(port_text) if port_text else default_port
        except ValueError:
            raise UsageError(f"address {text!r}: port {port_text!r} is not a number") from None
        if not 0 < port < 65536:
            raise UsageError(f"address {text!r}: port {port} is out of range")
        return cls(host, port)

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"https://{self}"


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address, IPv6 with or without brackets) is this host
    only: ``localhost`` or a loopback address (any other name might resolve beyond it)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False

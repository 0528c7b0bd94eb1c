"""Who is on the other end of a loopback TCP connection: the uid that owns the peer's socket.

Linux lists every TCP socket of this network namespace in ``/proc/net/tcp``
and ``/proc/net/tcp6`` with its local and remote address and its owner's uid.
For a connection that a service accepted, the peer's own socket is the entry
whose local address is the service's remote address and whose remote address
is the service's local address. This is what lets a service on loopback serve
only the user who runs it, as a Unix socket's ``SO_PEERCRED`` would.

Must never guess: an entry that cannot be found or read gives ``None``, and a
caller deciding access treats ``None`` as a stranger.
"""

from __future__ import annotations

import ipaddress
import sys
from pathlib import Path

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Endpoint = tuple[IpAddress, int]
_TABLES = (Path("/proc/net/tcp"), Path("/proc/net/tcp6"))


def endpoint(host: str, port: int) -> Endpoint | None:
    """``(address, port)`` with an IPv4-mapped IPv6 address taken as the IPv4 one."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address, port


def tcp_peer_uid(local: Endpoint, remote: Endpoint, *,
                 tables: tuple[Path, ...] = _TABLES) -> int | None:
    """The uid owning the socket at ``remote`` connected to ``local`` (this service's end)."""
    for table in tables:
        try:
            lines = table.read_text(encoding="ascii", errors="replace").splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 8:
                continue
            if (_decode(fields[1]) == remote and _decode(fields[2]) == local
                    and fields[7].isdigit()):
                return int(fields[7])
    return None


def _decode(field: str) -> Endpoint | None:
    """``0100007F:1F90`` (kernel words in host byte order) as ``(127.0.0.1, 8080)``."""
    host, _, port = field.partition(":")
    try:
        raw = bytes.fromhex(host)
        number = int(port, 16)
    except ValueError:
        return None
    if len(raw) not in (4, 16):
        return None
    if sys.byteorder == "little":
        raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    address: IpAddress = (ipaddress.IPv4Address(raw) if len(raw) == 4
                          else ipaddress.IPv6Address(raw))
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address, number

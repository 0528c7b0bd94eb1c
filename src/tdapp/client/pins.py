"""Pinned CAS certificates: the client talks only to the CAS certificate it accepted.

A pin is the whole certificate, kept as ``$TDAPP_HOME/pins/<host>_<port>.crt``
and used as the only trust anchor for that address, so a CAS presenting any
other certificate fails the TLS handshake. Must never pin silently.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from tdapp.errors import RefusedError, UnavailableError, UsageError
from tdapp.home import private_dir
from tdapp.tls import fingerprint, pem
from tdapp.volume.layout import write_atomically

DEFAULT_CAS = "127.0.0.1:8081"


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


def fetch_presented_certificate(address: Address) -> x509.Certificate:
    """The certificate a server presents, without trusting it (for showing and pinning)."""
    try:
        text = ssl.get_server_certificate((address.host, address.port), timeout=10)
    except OSError as error:
        raise UnavailableError(f"cannot reach the CAS at {address}: {error}") from None
    return x509.load_pem_x509_certificate(text.encode())


class PinStore:
    def __init__(self) -> None:
        self.folder = private_dir("pins")

    def _path_for(self, address: Address) -> Path:
        safe = str(address).replace("[", "").replace("]", "").replace(":", "_")
        return self.folder / f"{safe}.crt"

    def get(self, address: Address) -> x509.Certificate | None:
        try:
            return x509.load_pem_x509_certificate(self._path_for(address).read_bytes())
        except FileNotFoundError:
            return None

    def require(self, address: Address) -> x509.Certificate:
        pinned = self.get(address)
        if pinned is None:
            raise RefusedError(
                f"the CAS at {address} is not pinned; check its fingerprint and run: "
                f"tdapp cas attest {address} --accept FINGERPRINT")
        return pinned

    def pin(self, address: Address, certificate: x509.Certificate) -> None:
        write_atomically(self._path_for(address), pem(certificate))

    def describe(self, address: Address) -> str:
        pinned = self.get(address)
        return "not pinned" if pinned is None else f"pinned {fingerprint(pinned)}"

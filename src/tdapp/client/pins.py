"""Pinned CAS certificates: the client talks only to the CAS certificate it accepted.

A pin is the whole certificate, kept as ``$TDAPP_HOME/pins/<host>_<port>.crt``
and used as the only trust anchor for that address, so a CAS presenting any
other certificate fails the TLS handshake. Must never pin silently.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from cryptography import x509

from tdapp.core.address import Address
from tdapp.core.atomic import write_atomically
from tdapp.errors import RefusedError, UnavailableError
from tdapp.home import private_dir
from tdapp.tls import fingerprint, pem

DEFAULT_CAS = "127.0.0.1:8081"


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

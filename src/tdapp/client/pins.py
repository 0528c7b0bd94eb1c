"""Pinned CAS certificates: the client talks only to the CAS certificate it accepted.

A pin is the whole certificate, kept as ``$TDAPP_HOME/pins/<host>_<port>.crt``
and used as the only trust anchor for that address, so a CAS presenting any
other certificate fails the TLS handshake. Beside it, ``<host>_<port>.receipt.jwk``
is the CAS's receipt key, fetched over that pinned connection when the CAS is
pinned: receipts verify offline against it. Must never pin silently.
"""

from __future__ import annotations

import json
import ssl
from pathlib import Path

from cryptography import x509
from jwcrypto import jwk

from tdapp.attest.receipt import public_key_from_json, thumbprint
from tdapp.core.address import Address
from tdapp.core.atomic import write_atomically
from tdapp.core.origin import origin_of
from tdapp.errors import IntegrityError, RefusedError, UnavailableError
from tdapp.home import private_dir
from tdapp.tls import fingerprint, pem

DEFAULT_CAS = "127.0.0.1:8081"


def fetch_presented_certificate(address: Address) -> x509.Certificate:
    """The certificate a server presents, without trusting it (for showing and pinning)."""
    try:
        text = ssl.get_server_certificate((address.host, address.port), timeout=10)
    except OSError as error:
        raise UnavailableError(f"cannot reach the CAS at {address}{origin_of(address)}: "
                               f"{error}") from None
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
        try:
            pinned = self.get(address)
        except ValueError:
            raise IntegrityError(
                f"the pinned certificate {self._path_for(address)} for the CAS at "
                f"{address}{origin_of(address)} cannot be read; check the CAS's fingerprint "
                f"and pin it again: tdapp cas attest {address} --accept FINGERPRINT") from None
        if pinned is None:
            raise RefusedError(
                f"the CAS at {address}{origin_of(address)} is not pinned; check its "
                f"fingerprint and run: "
                f"tdapp cas attest {address} --accept FINGERPRINT")
        return pinned

    def pin(self, address: Address, certificate: x509.Certificate) -> None:
        write_atomically(self._path_for(address), pem(certificate))

    def _receipt_path(self, address: Address) -> Path:
        return self._path_for(address).with_suffix(".receipt.jwk")

    def pin_receipt_key(self, address: Address, key: jwk.JWK) -> None:
        write_atomically(self._receipt_path(address),
                         key.export_public().encode("utf-8"))

    def receipt_key(self, address: Address) -> jwk.JWK | None:
        try:
            return public_key_from_json(json.loads(self._receipt_path(address).read_text()))
        except FileNotFoundError:
            return None
        except (ValueError, IntegrityError):
            raise IntegrityError(f"the pinned receipt key of the CAS at {address} cannot be "
                                 f"read ({self._receipt_path(address)})") from None

    def receipt_keys(self) -> dict[str, jwk.JWK]:
        """Every pinned receipt key, by thumbprint (the ``kid`` of the receipts it signs)."""
        found: dict[str, jwk.JWK] = {}
        for path in sorted(self.folder.glob("*.receipt.jwk")):
            try:
                key = public_key_from_json(json.loads(path.read_text()))
            except (OSError, ValueError, IntegrityError):
                continue  # unreadable: it pins nothing
            found[thumbprint(key)] = key
        return found

    def describe(self, address: Address) -> str:
        pinned = self.get(address)
        return "not pinned" if pinned is None else f"pinned {fingerprint(pinned)}"

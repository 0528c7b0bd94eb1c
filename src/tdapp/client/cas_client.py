"""An HTTPS client for the CAS that trusts only the pinned certificate.

Owns talking to a CAS: pin checks, certifying the local identity once per CAS,
and turning HTTP answers into tdapp errors with the CAS's reason. Must never
send a request to a CAS whose certificate is not the pinned one.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Mapping
from typing import Any

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tdapp.client.identity import ClientIdentity
from tdapp.client.pins import PinStore, fetch_presented_certificate
from tdapp.core.address import Address
from tdapp.errors import (
    ConflictError,
    InputError,
    RefusedError,
    TdappError,
    UnavailableError,
)
from tdapp.tls import certificate_request, fingerprint, pem, save_certificate

_ERRORS: dict[int, type[TdappError]] = {
    400: InputError, 401: RefusedError, 403: RefusedError, 404: InputError,
    409: ConflictError, 413: InputError, 503: UnavailableError,
}


class CasClient:
    def __init__(self, address: Address, pinned: x509.Certificate,
                 identity: ClientIdentity | None) -> None:
        self.address = address
        self.pinned = pinned
        self.identity = identity

    @classmethod
    def connect(cls, address: Address, *, anonymous: bool = False) -> CasClient:
        """A client for a pinned CAS, with this user's identity certified by it."""
        pinned = PinStore().require(address)
        identity = None if anonymous else ClientIdentity.load_or_create()
        client = cls(address, pinned, identity)
        if identity is not None:
            client.ensure_certified()
        return client

    def _context(self, with_identity: bool) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        # The pinned certificate is the only trust anchor, so the name it was
        # issued for does not matter; what matters is that it is this exact one.
        context.check_hostname = False
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cadata=pem(self.pinned).decode())
        if with_identity and self.identity is not None:
            context.load_cert_chain(self._identity_certificate(), self.identity.key_path)
        return context

    def _identity_certificate(self) -> str:
        assert self.identity is not None
        return str(self.identity.cas_certificate_path(fingerprint(self.pinned)))

    def ensure_certified(self) -> None:
        assert self.identity is not None
        path = self.identity.cas_certificate_path(fingerprint(self.pinned))
        if path.exists():
            return
        csr = certificate_request(self.identity.key)
        answer = self._request("POST", "/v1/identities",
                               csr.public_bytes(serialization.Encoding.PEM),
                               with_identity=False,
                               content_type="application/x-pem-file")
        certificate = x509.load_pem_x509_certificate(str(answer["certificate"]).encode())
        save_certificate(certificate, path)

    def request(self, method: str, path: str, body: bytes | None = None,
                content_type: str = "application/x-yaml") -> dict[str, Any]:
        return self._request(method, path, body, with_identity=True, content_type=content_type)

    def request_json(self, method: str, path: str, document: Mapping[str, Any],
                     *, bearer: str | None = None) -> dict[str, Any]:
        return self._request(method, path, json.dumps(document).encode(),
                             with_identity=self.identity is not None,
                             content_type="application/json", bearer=bearer)

    def _request(self, method: str, path: str, body: bytes | None, *, with_identity: bool,
                 content_type: str, bearer: str | None = None) -> dict[str, Any]:
        headers = {"content-type": content_type} if body is not None else {}
        if bearer is not None:
            headers["authorization"] = f"Bearer {bearer}"
        try:
            with httpx.Client(verify=self._context(with_identity), timeout=30) as http:
                response = http.request(method, self.address.url + path, content=body,
                                        headers=headers)
        except httpx.HTTPError as error:
            raise self._transport_error(error) from None
        try:
            payload = response.json()
        except ValueError:
            payload = {"error": response.text.strip()[:200]}
        if response.status_code >= 400:
            reason = payload.get("error", response.reason_phrase) if isinstance(payload, dict) \
                else response.reason_phrase
            kind = _ERRORS.get(response.status_code, UnavailableError)
            raise kind(f"CAS {self.address} refused ({response.status_code}): {reason}")
        if not isinstance(payload, dict):
            raise UnavailableError(f"CAS {self.address} sent an unexpected answer")
        return payload

    def _transport_error(self, error: httpx.HTTPError) -> TdappError:
        if "CERTIFICATE_VERIFY_FAILED" in str(error):
            try:
                presented = fingerprint(fetch_presented_certificate(self.address))
            except TdappError:
                presented = "unknown"
            return RefusedError(
                f"the CAS at {self.address} presented certificate {presented}, not the pinned "
                f"{fingerprint(self.pinned)}; refusing to talk to it. If the CAS was re-keyed "
                f"on purpose, check the new fingerprint and run: tdapp cas attest "
                f"{self.address} --accept NEW_FINGERPRINT")
        return UnavailableError(f"cannot reach the CAS at {self.address}: {error}")

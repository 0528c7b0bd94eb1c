"""An HTTPS client for the CAS that trusts only the pinned certificate.

Owns talking to a CAS: pin checks, certifying the local identity once per CAS,
and turning error answers ``{"kind", "reason"}`` into the tdapp error of their
kind (:func:`tdapp.errors.error_for`) with the CAS's reason. A request the CAS
refused as overloaded (429 or 503 with a Retry-After) is sent again, at most
:data:`MAX_ATTEMPTS` times in all, when repeating it is safe. Must never send a
request to a CAS whose certificate is not the pinned one.
"""

from __future__ import annotations

import json
import ssl
import time
from collections.abc import Iterator, Mapping
from typing import Any

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tdapp.client.identity import ClientIdentity
from tdapp.client.pins import PinStore, fetch_presented_certificate
from tdapp.core.address import Address
from tdapp.core.origin import origin_of
from tdapp.errors import (
    ErrorKind,
    RefusedError,
    TdappError,
    UnavailableError,
    error_for,
)
from tdapp.tls import certificate_request, fingerprint, pem, save_certificate

MAX_ATTEMPTS = 3
"""Attempts of one request in all, when the CAS answers that it is overloaded."""
MAX_RETRY_WAIT = 10.0
"""The longest wait between attempts, whatever Retry-After asks (seconds)."""
NONCE_PATH = "/v1/attestation/nonce"


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
                content_type: str = "application/x-yaml", *,
                bearer: str | None = None) -> dict[str, Any]:
        return self._request(method, path, body, with_identity=self.identity is not None,
                             content_type=content_type, bearer=bearer)

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
                for attempt in range(1, MAX_ATTEMPTS + 1):
                    response = http.request(method, self.address.url + path, content=body,
                                            headers=headers)
                    wait = _retry_wait(method, path, response)
                    if wait is None or attempt == MAX_ATTEMPTS:
                        break
                    time.sleep(wait)
        except httpx.HTTPError as error:
            raise self._transport_error(error) from None
        try:
            payload = response.json()
        except ValueError:
            payload = None
        if response.status_code >= 400:
            raise self._refusal(response.status_code, payload, response)
        if not isinstance(payload, dict):
            raise UnavailableError(f"CAS {self.address} sent an unexpected answer")
        return payload

    def _refusal(self, status: int, payload: Any, response: httpx.Response) -> TdappError:
        kind, reason = _kind_and_reason(payload)
        if kind is None:
            # Not the CAS's own error body (a proxy's page, say): nothing says what went
            # wrong, only that the CAS did not serve the request.
            text = " ".join(response.text.split())[:200] or response.reason_phrase
            return UnavailableError(f"CAS {self.address} answered HTTP {status} without an "
                                    f"error kind: {text}")
        return error_for(kind)(f"CAS {self.address} refused ({status}): {reason}")

    def _transport_error(self, error: httpx.HTTPError) -> TdappError:
        if any(isinstance(cause, ssl.SSLCertVerificationError) for cause in _causes(error)):
            try:
                presented = fingerprint(fetch_presented_certificate(self.address))
            except TdappError:
                presented = "unknown"
            return RefusedError(
                f"the CAS at {self.address} presented certificate {presented}, not the pinned "
                f"{fingerprint(self.pinned)}; refusing to talk to it. If the CAS was re-keyed "
                f"on purpose, check the new fingerprint and run: tdapp cas attest "
                f"{self.address} --accept NEW_FINGERPRINT")
        return UnavailableError(f"cannot reach the CAS at {self.address}{origin_of(self.address)}: "
                                f"{error}")


def _causes(error: BaseException) -> Iterator[BaseException]:
    """``error`` and what it was raised from or during (httpx wraps the ssl module's errors)."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _kind_and_reason(payload: Any) -> tuple[str | None, str]:
    """``(kind, reason)`` of an error body ``{"kind", "reason"}``; no kind for any other."""
    if not isinstance(payload, dict) or not isinstance(payload.get("kind"), str):
        return None, ""
    return payload["kind"], " ".join(str(payload.get("reason", "")).split())[:1000]


def _retry_wait(method: str, path: str, response: httpx.Response) -> float | None:
    """How long to wait before sending the request again, or None not to.

    Only an overload refusal (429 or 503 with a Retry-After in seconds) is retried,
    and only when repeating the request cannot do anything twice: a GET, a nonce
    request (issuing one writes nothing), or any request the CAS refused as
    ``overloaded``, which it does before any of the request's work (its rate limit
    and work-slot queues, tdapp.cas.ratelimit).
    """
    retry_after = response.headers.get("Retry-After", "").strip()
    if response.status_code not in (429, 503) or not (
            retry_after.isascii() and retry_after.isdigit()):
        return None
    try:
        kind, _ = _kind_and_reason(response.json())
    except ValueError:
        kind = None
    if method != "GET" and path.split("?")[0] != NONCE_PATH and kind != ErrorKind.OVERLOADED:
        return None
    return min(float(retry_after), MAX_RETRY_WAIT)

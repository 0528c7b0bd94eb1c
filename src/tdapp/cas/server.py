"""The CAS's HTTPS API (aiohttp): routing, client identities, error answers.

It turns requests into calls on the authorities and their errors into JSON
answers ``{"kind", "reason"}`` whose status is the error's own
(:func:`tdapp.webjson.error_middleware`); it decides nothing itself. The client's identity is
the key hash of the TLS client certificate it presented (certificates are
issued by this CAS's client CA, see ``POST /v1/identities``). No request may
produce a 500: an unexpected failure is logged and answered as one.

What a request may cost is settled before its body is read: a request that
needs an identity and has none gets 401 unread; each endpoint reads at most its
own body limit (small for the anonymous ones); and the requests that parse and
judge a document hold one of their client's and, while judged, one of all
clients' work slots (:class:`~tdapp.cas.ratelimit.WorkSlots`), so anonymous
callers cannot keep the CAS from issuing nonces.
"""

from __future__ import annotations

import functools
import json
import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from aiohttp import web
from cryptography import x509

from tdapp.cas.attestation import AttestationAuthority, AttestationRequest
from tdapp.cas.materials import CasMaterials
from tdapp.cas.metrics import CasMetrics
from tdapp.cas.openapi import openapi_document
from tdapp.cas.ratelimit import Caller, RateLimit, WorkSlots
from tdapp.cas.sessions import SessionAuthority
from tdapp.cas.tags import Move
from tdapp.cas.thread_hop import ThreadHop
from tdapp.errors import AuthenticationRequired, InputError
from tdapp.policy import Identity
from tdapp.policy.reader import MAX_CHARS as MAX_DOCUMENT_BYTES
from tdapp.tls import certificate_key_hash, issue_client_certificate, pem
from tdapp.webjson import error_middleware, json_object, parse_json_object, read_body

MAX_BODY = MAX_DOCUMENT_BYTES  # a session document; every other endpoint takes less
ATTESTATION_MAX_BODY = 256 * 1024  # a DCAP quote with its collateral is under 40 KiB
CSR_MAX_BODY = 16 * 1024  # a PEM CSR for an EC key is under 1 KiB
SMALL_JSON_MAX_BODY = 4096  # nonce requests and tag reports are under 500 bytes
log = logging.getLogger("tdapp.cas")
T = TypeVar("T")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_AUTHORITY = web.AppKey("authority", SessionAuthority)
_ATTESTATION = web.AppKey("attestation", AttestationAuthority)
_MATERIALS = web.AppKey("materials", CasMaterials)
_SLOTS = web.AppKey("work slots", WorkSlots)


def client_identity(request: web.Request) -> Identity | None:
    """The key hash of the verified client certificate, or None when none was presented."""
    ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
    if not isinstance(ssl_object, ssl.SSLObject):
        return None
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        return None
    # A function of the certificate's bytes (which TLS verified): parsed once per
    # certificate, not once per request.
    known = _IDENTITIES.get(der)
    if known is None:
        known = certificate_key_hash(x509.load_der_x509_certificate(der))
        if len(_IDENTITIES) >= _IDENTITIES_KEPT:
            _IDENTITIES.clear()
        _IDENTITIES[der] = known
    return known


_IDENTITIES: dict[bytes, Identity] = {}
_IDENTITIES_KEPT = 4096


_HOP = ThreadHop()


async def _in_thread(function: Callable[..., T], *args: Any) -> T:
    """Run blocking store work off the event loop."""
    return await _HOP.run(functools.partial(function, *args))


def _text(body: bytes) -> str:
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError("the request body is not UTF-8 text") from None


def _required_identity(request: web.Request) -> Identity:
    """The client's identity, or 401 before anything of the body is read or parsed."""
    who = client_identity(request)
    if who is None:
        raise AuthenticationRequired("a client certificate is required "
                                     "(run: tdapp cas attest HOST:PORT)")
    return who


CHEAP_BODY = 8 * 1024
"""Bodies up to this size (declared by Content-Length) are parsed without a work slot."""


async def _judged(request: web.Request, limit: int, judge: Callable[[bytes], T]) -> T:
    """Read the body (in one of the client's work slots) and judge it off the event loop
    (in one of all clients' work slots)."""
    length = request.content_length
    if length is not None and length <= CHEAP_BODY:
        # A small body is cheap to parse: bounding it would only make honest
        # concurrent callers (replicas' racers, many updates) wait or retry.
        return await _in_thread(judge, await read_body(request, limit))
    slots = request.app[_SLOTS]
    caller = Caller.ANONYMOUS if client_identity(request) is None else Caller.IDENTIFIED
    async with slots.for_client(request.remote or "unknown", caller):
        body = await read_body(request, limit)
        async with slots.for_work():
            return await _in_thread(judge, body)


# -- handlers -------------------------------------------------------------------------


async def submit_session(request: web.Request) -> web.Response:
    who = _required_identity(request)
    authority = request.app[_AUTHORITY]
    name, digest, created = await _judged(
        request, MAX_BODY, lambda body: authority.submit(_text(body), who))
    return web.json_response({"name": name, "hash": digest}, status=201 if created else 200)


async def create_session(request: web.Request) -> web.Response:
    who = _required_identity(request)
    authority = request.app[_AUTHORITY]
    name, digest = await _judged(
        request, MAX_BODY, lambda body: authority.create(_text(body), who))
    return web.json_response({"name": name, "hash": digest}, status=201)


async def update_session(request: web.Request) -> web.Response:
    who = _required_identity(request)
    authority = request.app[_AUTHORITY]
    name = request.match_info["name"]
    digest = await _judged(
        request, MAX_BODY, lambda body: authority.update(name, _text(body), who))
    return web.json_response({"name": name, "hash": digest})


async def delete_session(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    await _in_thread(request.app[_AUTHORITY].delete, name, client_identity(request))
    return web.json_response({"name": name, "deleted": True})


async def list_sessions(request: web.Request) -> web.Response:
    listed = await _in_thread(request.app[_AUTHORITY].created_by, client_identity(request))
    return web.json_response({"sessions": listed})


async def read_session(request: web.Request) -> web.Response:
    found = await _in_thread(
        request.app[_AUTHORITY].read, request.match_info["name"], client_identity(request))
    return web.json_response({"name": found.session.name, "session": found.session.to_yaml(),
                              "hash": found.hash, "creator": found.creator,
                              "public_secrets": found.public_secrets,
                              "enclave_challenges": found.enclave_challenges})


def _query(request: web.Request, key: str) -> str:
    value = request.query.get(key)
    if not value:
        raise InputError(f"the query parameter {key!r} is required")
    return value


async def read_volume(request: web.Request) -> web.Response:
    name, volume = _query(request, "session"), _query(request, "volume")
    tag = await _in_thread(
        request.app[_AUTHORITY].volume_tag, name, volume, client_identity(request))
    return web.json_response({"session": name, "volume": volume, "tag": tag})


async def read_audit(request: web.Request) -> web.Response:
    events = await _in_thread(
        request.app[_AUTHORITY].audit, _query(request, "session"), client_identity(request))
    return web.json_response({"events": [event.as_json() for event in events]})


async def certify_identity(request: web.Request) -> web.Response:
    """Issue a client certificate for the key in a CSR (proof of possession checked)."""
    materials = request.app[_MATERIALS]

    def certify(body: bytes) -> x509.Certificate:
        try:
            csr = x509.load_pem_x509_csr(body)
        except ValueError:
            raise InputError("the body must be a PEM certificate signing request") from None
        return issue_client_certificate(csr, materials.client_ca_key, materials.client_ca)

    certificate = await _judged(request, CSR_MAX_BODY, certify)
    return web.json_response(
        {"identity": certificate_key_hash(certificate), "certificate": pem(certificate).decode()},
        status=201)


def _string(body: dict[str, Any], key: str, *, optional: bool = False) -> str | None:
    value = body.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value:
        raise InputError(f"the request needs a string {key!r}")
    return value


async def issue_nonce(request: web.Request) -> web.Response:
    body = await json_object(request, SMALL_JSON_MAX_BODY)
    session, service = _string(body, "session"), _string(body, "service")
    assert session is not None and service is not None
    authority = request.app[_ATTESTATION]
    # A session verified lately needs no database read: issued here, without a thread.
    issued = authority.issue_nonce_from_memory(session, service)
    if issued is None:
        issued = await _in_thread(authority.issue_nonce, session, service)
    nonce, expires_at, mode = issued
    return web.json_response({"nonce": nonce, "expires_at": expires_at, "mode": mode},
                             status=201)


async def attest(request: web.Request) -> web.Response:
    authority = request.app[_ATTESTATION]
    # A reader of the session posting with its client certificate is told a refusal's
    # full reason; anyone else only which check failed.
    caller = client_identity(request)
    sealed, _ = await _judged(request, ATTESTATION_MAX_BODY, lambda body: authority.attest(
        AttestationRequest.from_json(parse_json_object(body)), caller=caller))
    return web.json_response({"jwe": sealed})


async def update_tag(request: web.Request) -> web.Response:
    token = _bearer(request, "a tag update")
    body = await json_object(request, SMALL_JSON_MAX_BODY)
    session, volume = _string(body, "session"), _string(body, "volume")
    old, new = _string(body, "old", optional=True), _string(body, "new")
    assert session is not None and volume is not None and new is not None
    await _in_thread(request.app[_ATTESTATION].update_tag, token, session, volume, old, new)
    return web.json_response({"session": session, "volume": volume, "tag": new})


async def commit_run(request: web.Request) -> web.Response:
    token = _bearer(request, "a run's commit")
    body = await json_object(request, SMALL_JSON_MAX_BODY)
    session = _string(body, "session")
    bundle = _string(body, "bundle_sha256", optional=True)
    moves = _moves(body)
    assert session is not None
    label, url = _string(body, "label", optional=True), _string(body, "url", optional=True)
    receipt = await _in_thread(lambda: request.app[_ATTESTATION].tags.commit_run(
        token, session, moves, bundle, label=label, url=url))
    return web.json_response({"receipt": receipt})


async def replace_volumes(request: web.Request) -> web.Response:
    """The session's owner moves its own volumes' tags to those of volumes it made."""
    body = await json_object(request, SMALL_JSON_MAX_BODY)
    session = _string(body, "session")
    moves = _moves(body)
    assert session is not None
    await _in_thread(request.app[_ATTESTATION].tags.replace_volumes, client_identity(request),
                     session, moves)
    return web.json_response({"session": session,
                              "tags": {move.volume: move.new for move in moves}})


def _moves(body: dict[str, Any]) -> list[Move]:
    raw = body.get("moves")
    if not isinstance(raw, list) or len(raw) > 256:
        raise InputError("the request needs a list 'moves' (at most 256)")
    moves = []
    for item in raw:
        if not isinstance(item, dict):
            raise InputError("each move is an object with 'volume', 'old' and 'new'")
        volume, new = _string(item, "volume"), _string(item, "new")
        old = _string(item, "old", optional=True)
        assert volume is not None and new is not None
        moves.append(Move(volume, old, new))
    return moves


async def labelled_run(request: web.Request) -> web.Response:
    token = _bearer(request, "looking up a run")
    name, label = _query(request, "session"), _query(request, "label")
    receipt, url = await _in_thread(request.app[_ATTESTATION].tags.labelled_run, token, name,
                                    label)
    return web.json_response({"receipt": receipt, "url": url})


async def read_receipt(request: web.Request) -> web.Response:
    name, bundle = _query(request, "session"), _query(request, "bundle")

    def lookup() -> str:
        request.app[_AUTHORITY].read(name, client_identity(request))  # readers only
        return request.app[_ATTESTATION].tags.receipt_for(name, bundle)

    return web.json_response({"receipt": await _in_thread(lookup)})


async def receipt_key(request: web.Request) -> web.Response:
    signer = request.app[_MATERIALS].receipt_signer
    return web.json_response({"jwk": signer.public_jwk(), "kid": signer.kid})


def _bearer(request: web.Request, what: str) -> str:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise AuthenticationRequired(f"{what} needs the instance's token "
                                     "(Authorization: Bearer …)")
    return token


async def openapi(request: web.Request) -> web.Response:
    return web.Response(text=json.dumps(openapi_document()), content_type="application/json")


async def session_defaults(request: web.Request) -> web.Response:
    """What this CAS writes into a session that names no mode (public: it is the CAS's
    configuration, not a session's), so a client can predict a session's hash."""
    defaults = request.app[_AUTHORITY].defaults
    return web.json_response({"mode": str(defaults.mode), "platforms": list(defaults.platforms)})


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "fingerprint": request.app[_MATERIALS].fingerprint})


def create_app(authority: SessionAuthority, attestation: AttestationAuthority,
               materials: CasMaterials, metrics: CasMetrics,
               rate_limit: RateLimit | None = None,
               work_slots: WorkSlots | None = None) -> web.Application:
    errors = error_middleware(service="CAS", max_body=MAX_BODY)
    middlewares = [metrics.middleware(), errors]
    if rate_limit is not None:
        middlewares.insert(1, rate_limit.middleware())
    app = web.Application(middlewares=middlewares, client_max_size=MAX_BODY)
    app.router.add_get("/metrics", metrics.handle)
    app[_AUTHORITY] = authority
    app[_ATTESTATION] = attestation
    app[_MATERIALS] = materials
    app[_SLOTS] = work_slots or WorkSlots()
    # Session names may hold "/" (namespaces), so a name is always the rest of the
    # path, and what is about a session (its volumes, its audit log) takes it as a query.
    app.router.add_post("/session", submit_session)
    app.router.add_post("/v1/sessions", create_session)
    app.router.add_get("/v1/sessions", list_sessions)
    app.router.add_get("/v1/volume-tags", read_volume)
    app.router.add_put("/v1/volume-tags", update_tag)
    app.router.add_post("/v1/volume-tags/replace", replace_volumes)
    app.router.add_post("/v1/attestation/nonce", issue_nonce)
    app.router.add_post("/v1/attestation", attest)
    app.router.add_get("/v1/audit", read_audit)
    app.router.add_post("/v1/runs/commit", commit_run)
    app.router.add_get("/v1/receipts", read_receipt)
    app.router.add_get("/v1/runs", labelled_run)
    app.router.add_get("/v1/receipt-key", receipt_key)
    app.router.add_get("/v1/sessions/{name:.+}", read_session)
    app.router.add_put("/v1/sessions/{name:.+}", update_session)
    app.router.add_delete("/v1/sessions/{name:.+}", delete_session)
    app.router.add_get("/session/{name:.+}", read_session)
    app.router.add_post("/v1/identities", certify_identity)
    app.router.add_get("/v1/health", health)
    app.router.add_get("/v1/session-defaults", session_defaults)
    app.router.add_get("/openapi.json", openapi)
    app.router.add_get("/v1/openapi.json", openapi)
    return app

"""The CAS's published OpenAPI 3.0 document (served at ``/openapi.json``).

Every error answer is ``{"kind", "reason"}``; the kinds and their statuses are
in docs/cas.md, "Errors".
"""

from __future__ import annotations

from typing import Any

from tdapp import __version__
from tdapp.errors import ErrorKind

_ERROR = {"type": "object", "required": ["kind", "reason"], "additionalProperties": False,
          "properties": {"kind": {"type": "string", "enum": [str(kind) for kind in ErrorKind],
                                  "description": "what went wrong; a client acts on this"},
                         "reason": {"type": "string",
                                    "description": "one line for a person to read"}}}
_HASHED = {"type": "object", "required": ["name", "hash"],
           "properties": {"name": {"type": "string"},
                          "hash": {"type": "string", "pattern": "^[0-9a-f]{64}$"}}}
_YAML_BODY = {"required": True, "content": {"application/x-yaml": {"schema": {"type": "string"}}}}
_EVENTS = {"type": "object", "required": ["events"],
           "properties": {"events": {"type": "array", "items": {"type": "object"}}}}
_NAME = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}


def _query(name: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": True, "schema": {"type": "string"}}


def _json_body(properties: dict[str, Any], optional: tuple[str, ...] = ()) -> dict[str, Any]:
    required = [name for name in properties if name not in optional]
    return {"required": True, "content": {"application/json": {"schema": {
        "type": "object", "required": required, "properties": properties}}}}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*statuses: int) -> dict[str, Any]:
    reasons = {400: "input (or usage): invalid request, with the reason",
               401: "authentication_required: a client certificate (or an instance token) "
                    "is required",
               403: "refused: by the access policy or the attestation checks",
               404: "not_found: no such session, service or volume",
               408: "timeout: the request body stalled past the body timeout",
               409: "conflict: stale predecessor or tag, or name taken",
               413: "too_large: request body too large",
               429: "overloaded: too many requests, or too many in progress, from this "
                    "client; nothing was done (Retry-After)",
               503: "unavailable: database unavailable; integrity: stored data failed its "
                    "check; overloaded: too many documents being checked, nothing was done "
                    "(Retry-After)"}
    return {str(status): _json(_ERROR, reasons[status]) for status in statuses}


def openapi_document() -> dict[str, Any]:
    read_responses = {"200": _json({"type": "object",
                                    "required": ["name", "session", "hash", "creator"],
                                    "properties": {"name": {"type": "string"},
                                                   "session": {"type": "string"},
                                                   "hash": {"type": "string"},
                                                   "creator": {"type": "string"},
                                                   "public_secrets": {
                                                       "type": "object",
                                                       "additionalProperties": {
                                                           "type": "string"}}}},
                                   "the normalized session, its hash, and the public part "
                                   "of its export_public secrets"),
                      **_errors(400, 401, 403, 404, 503)}
    return {
        "openapi": "3.0.3",
        "info": {"title": "tdapp CAS", "version": __version__,
                 "description": "Sessions, identities, volume tags and the audit log. Clients "
                                "authenticate with TLS client certificates issued by "
                                "POST /v1/identities."},
        "paths": {
            "/session": {"post": {
                "summary": "Create a session, or update it when it names a predecessor "
                           "(SCONE-compatible)",
                "requestBody": _YAML_BODY,
                "responses": {"201": _json(_HASHED, "created"), "200": _json(_HASHED, "updated"),
                              **_errors(400, 401, 403, 404, 408, 409, 413, 429, 503)}}},
            "/v1/sessions": {"post": {
                "summary": "Create a session", "requestBody": _YAML_BODY,
                "responses": {"201": _json(_HASHED, "created"),
                              **_errors(400, 401, 408, 409, 413, 429, 503)}},
                "get": {
                "summary": "The caller's own sessions (a client certificate)",
                "responses": {"200": _json({"type": "object", "required": ["sessions"],
                                            "properties": {"sessions": {"type": "array"}}},
                                           "name, hash, revision, mode, created_at, "
                                           "updated_at of each"),
                              **_errors(401, 503)}}},
            "/v1/sessions/{name}": {
                "get": {"summary": "Read a session (readers only)", "parameters": [_NAME],
                        "responses": read_responses},
                "delete": {"summary": "Delete a session (access_policy.update): its sealed "
                                      "document, secrets and tags go, its audit log stays",
                           "parameters": [_NAME],
                           "responses": {"200": _json({"type": "object"}, "deleted"),
                                         **_errors(401, 403, 404, 409, 503)}},
                "put": {"summary": "Update a session; the document names the current hash as "
                                   "predecessor", "parameters": [_NAME],
                        "requestBody": _YAML_BODY,
                        "responses": {"200": _json(_HASHED, "updated"),
                                      **_errors(400, 401, 403, 404, 408, 409, 413, 429, 503)}}},
            "/session/{name}": {"get": {"summary": "Read a session (SCONE path)",
                                        "parameters": [_NAME], "responses": read_responses}},
            "/v1/attestation/nonce": {"post": {
                "summary": "A one-time nonce for attesting SESSION/SERVICE (expires)",
                "requestBody": _json_body({"session": {"type": "string"},
                                           "service": {"type": "string"}}),
                "responses": {"201": _json({"type": "object",
                                            "required": ["nonce", "expires_at", "mode"],
                                            "properties": {"nonce": {"type": "string"},
                                                           "expires_at": {"type": "number"},
                                                           "mode": {"type": "string"}}},
                                           "the nonce"),
                              **_errors(400, 403, 404, 408, 413, 429, 503)}}},
            "/v1/attestation": {"post": {
                "summary": "Evidence and an ephemeral key in; the configuration out, as a JWE "
                           "to that key",
                "requestBody": _json_body({"session": {"type": "string"},
                                           "service": {"type": "string"},
                                           "nonce": {"type": "string"},
                                           "public_key": {"type": "string"},
                                           "workload": {"type": "string",
                                                        "pattern": "^[0-9a-f]{64}$"},
                                           "evidence": {"type": "object"}},
                                          optional=("evidence",)),
                "responses": {"200": _json({"type": "object", "required": ["jwe"],
                                            "properties": {"jwe": {"type": "string"}}},
                                           "the encrypted configuration"),
                              **_errors(400, 403, 404, 408, 413, 429, 503)}}},
            "/v1/volume-tags": {"put": {
                "summary": "Report a volume's new tag (the attested instance only; "
                           "compare-and-swap on the old tag)",
                "parameters": [{"name": "Authorization", "in": "header", "required": False,
                                "schema": {"type": "string"}}],
                "requestBody": _json_body({"session": {"type": "string"},
                                           "volume": {"type": "string"},
                                           "old": {"type": "string", "nullable": True},
                                           "new": {"type": "string"}}),
                "responses": {"200": _json({"type": "object"}, "the tag moved"),
                              **_errors(400, 401, 403, 404, 408, 409, 413, 429, 503)}},
                "get": {
                "summary": "The current tag of a session's volume (readers only)",
                "parameters": [_query("session"), _query("volume")],
                "responses": {"200": _json({"type": "object",
                                            "required": ["session", "volume", "tag"],
                                            "properties": {
                                                "session": {"type": "string"},
                                                "volume": {"type": "string"},
                                                "tag": {"type": "string", "nullable": True}}},
                                           "the current tag"),
                              **_errors(400, 401, 403, 404, 503)}}},
            "/v1/volume-tags/replace": {"post": {
                "summary": "Replace the session's own volumes by new ones its owner made "
                           "(access_policy.update; compare-and-swap on each old tag, all or "
                           "none)",
                "requestBody": _json_body({"session": {"type": "string"},
                                           "moves": {"type": "array", "items": {
                                               "type": "object"}}}),
                "responses": {"200": _json({"type": "object"}, "the tags moved"),
                              **_errors(400, 401, 403, 404, 408, 409, 413, 429, 503)}}},
            "/v1/runs/commit": {"post": {
                "summary": "Commit a run: move every output tag at once (the attested instance "
                           "only; compare-and-swap each) and get the run's signed receipt",
                "parameters": [{"name": "Authorization", "in": "header", "required": False,
                                "schema": {"type": "string"}}],
                "requestBody": _json_body({"session": {"type": "string"},
                                           "moves": {"type": "array", "items": {
                                               "type": "object"}},
                                           "bundle_sha256": {"type": "string",
                                                             "nullable": True},
                                           "label": {"type": "string", "nullable": True},
                                           "url": {"type": "string", "nullable": True}},
                                          optional=("bundle_sha256", "label", "url")),
                "responses": {"200": _json({"type": "object", "required": ["receipt"],
                                            "properties": {"receipt": {"type": "string"}}},
                                           "the receipt, a compact JWS"),
                              **_errors(400, 401, 403, 404, 408, 409, 413, 429, 503)}}},
            "/v1/runs": {"get": {
                "summary": "The receipt and URL of a committed run of SESSION labelled LABEL "
                           "(an instance of that session only: a redelivered pool task asks)",
                "parameters": [{"name": "Authorization", "in": "header", "required": False,
                                "schema": {"type": "string"}},
                               _query("session"), _query("label")],
                "responses": {"200": _json({"type": "object", "required": ["receipt", "url"],
                                            "properties": {"receipt": {"type": "string"},
                                                           "url": {"type": "string",
                                                                   "nullable": True}}},
                                           "the earlier run"),
                              **_errors(400, 401, 403, 404, 503)}}},
            "/v1/receipts": {"get": {
                "summary": "The receipt of the session's run that uploaded a bundle (readers "
                           "only)",
                "parameters": [_query("session"), _query("bundle")],
                "responses": {"200": _json({"type": "object", "required": ["receipt"],
                                            "properties": {"receipt": {"type": "string"}}},
                                           "the receipt, a compact JWS"),
                              **_errors(400, 401, 403, 404, 503)}}},
            "/v1/receipt-key": {"get": {
                "summary": "The public key that signs this CAS's receipts (a JWK) and its "
                           "RFC 7638 thumbprint",
                "responses": {"200": _json({"type": "object", "required": ["jwk", "kid"],
                                            "properties": {"jwk": {"type": "object"},
                                                           "kid": {"type": "string"}}},
                                           "the receipt key")}}},
            "/v1/audit": {"get": {
                "summary": "The audit log of a session (readers only)",
                "parameters": [_query("session")],
                "responses": {"200": _json(_EVENTS, "events, oldest first"),
                              **_errors(400, 401, 403, 404, 503)}}},
            "/v1/identities": {"post": {
                "summary": "Certify a client key: send a PEM CSR, get a client certificate",
                "requestBody": {"required": True, "content": {
                    "application/x-pem-file": {"schema": {"type": "string"}}}},
                "responses": {"201": _json({"type": "object",
                                            "required": ["identity", "certificate"],
                                            "properties": {"identity": {"type": "string"},
                                                           "certificate": {"type": "string"}}},
                                           "the certificate"),
                              **_errors(400, 408, 413, 429, 503)}}},
            "/v1/health": {"get": {"summary": "Liveness and the CAS certificate fingerprint",
                                   "responses": {"200": _json({"type": "object"}, "up")}}},
            "/v1/session-defaults": {"get": {
                "summary": "The mode (and sim platforms) written into sessions that name none",
                "responses": {"200": _json({"type": "object", "required": ["mode", "platforms"],
                                            "properties": {"mode": {"type": "string"},
                                                           "platforms": {"type": "array"}}},
                                           "the defaults")}}},
        },
    }

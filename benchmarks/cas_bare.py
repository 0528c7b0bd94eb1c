"""The bare-stack ceiling of ``cas_load.py``: the CAS's HTTP stack answering with no work.

``python benchmarks/cas_bare.py --state-dir DIR --host H --port P [--workers N]`` serves
the two requests of an attestation, ``POST /v1/attestation/nonce`` and ``POST
/v1/attestation``, on the CAS's own stack: aiohttp through
:func:`tdapp.serving.serve_until_signalled` (its handshake and header timeouts), the
TLS context the CAS builds from the same state folder
(:meth:`tdapp.cas.materials.CasMaterials.server_context`: TLS 1.2+, ECDHE-AESGCM,
client certificates requested and verified against the CAS's client CA), N processes
on one port as ``tdapp cas serve --workers N`` (:mod:`tdapp.cas.workers`). Each
handler reads and parses its JSON body (any server does), checks that a client
certificate was verified, and answers fixed JSON of the CAS's answer sizes: nothing
is judged, sealed, stored or logged. It protects nothing and must only ever listen on
loopback, for the benchmark.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import ssl
import sys

from aiohttp import web

from tdapp.cas.materials import CasMaterials
from tdapp.cas.workers import reuseport_sockets, run_workers
from tdapp.serving import serve_until_signalled

NONCE_ANSWER = json.dumps({"nonce": "ab" * 40, "expires_at": 1.0e9, "mode": "sim"})
# A compact JWE as long as the CAS's answer for the benchmark's session (1,256 characters).
JWE_ANSWER = json.dumps({"jwe": ".".join(("e" * 334, "", "i" * 16, "c" * 880, "t" * 22))})


def _has_client_certificate(request: web.Request) -> bool:
    ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
    return isinstance(ssl_object, ssl.SSLObject) and bool(ssl_object.getpeercert(True))


async def nonce(request: web.Request) -> web.Response:
    json.loads(await request.read())
    return web.Response(text=NONCE_ANSWER, status=201, content_type="application/json")


async def attestation(request: web.Request) -> web.Response:
    json.loads(await request.read())
    if not _has_client_certificate(request):
        return web.Response(status=401)
    return web.Response(text=JWE_ANSWER, content_type="application/json")


def make_app() -> web.Application:
    app = web.Application()
    app.router.add_post("/v1/attestation/nonce", nonce)
    app.router.add_post("/v1/attestation", attestation)
    return app


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--state-dir", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    from pathlib import Path

    materials = CasMaterials.load_or_create(Path(args.state_dir))

    def serve(sock: socket.socket | int, ready: object) -> None:
        def started(_: object) -> None:
            if callable(ready):
                ready()

        asyncio.run(serve_until_signalled(
            [(make_app(), args.host, sock, materials.server_context())], started))

    if args.workers == 1:
        serve(args.port, None)
        return 0
    sockets = reuseport_sockets(args.host, args.port, args.workers)
    run_workers(sockets, lambda sock, _index, ready: serve(sock, ready), lambda: None)
    return 0


if __name__ == "__main__":
    sys.exit(main())

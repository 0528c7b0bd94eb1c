"""Receipts from the client's side: pinning the CAS's receipt key, checking a receipt.

- :func:`pin_receipt_key`: fetch the key over the pinned TLS connection and pin it;
  a changed key is refused unless the user accepts the CAS anew.
- :func:`check_receipt`: a receipt file (or text) verified offline against the
  pinned keys (or one given), and optionally against a bundle, a session and an
  output tag, each mismatch refused with its reason.
- :func:`receipt_of_bundle`: the receipt the CAS keeps for a bundle (readers only).

Whether a receipt is genuine is :func:`tdapp.attest.receipt.verify_receipt`'s
decision; this module only supplies the keys and the expectations.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlencode

from jwcrypto import jwk

from tdapp.attest.receipt import Receipt, public_key_from_json, thumbprint, verify_receipt
from tdapp.client.cas_client import CasClient
from tdapp.client.pins import PinStore
from tdapp.core.address import Address
from tdapp.errors import IntegrityError, NotFoundError, RefusedError


def pin_receipt_key(client: CasClient, address: Address, *, replace: bool) -> str:
    """Pin the receipt key the CAS at ``address`` publishes; its thumbprint."""
    answer = client.request("GET", "/v1/receipt-key")
    key = public_key_from_json(answer.get("jwk"))
    kid = thumbprint(key)
    if answer.get("kid") != kid:
        raise IntegrityError(f"the CAS at {address} published a receipt key whose thumbprint "
                             "is not the one it states")
    pins = PinStore()
    pinned = pins.receipt_key(address)
    if pinned is not None and thumbprint(pinned) != kid and not replace:
        raise RefusedError(f"the CAS at {address} now signs receipts with key {kid}, but "
                           f"{thumbprint(pinned)} is pinned; if the change is expected, run: "
                           f"tdapp cas attest {address} --accept FINGERPRINT")
    pins.pin_receipt_key(address, key)
    return kid


def bundle_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def check_receipt(text: str, *, keys: Mapping[str, jwk.JWK] | None = None,
                  bundle: Path | None = None, session: str | None = None,
                  output: tuple[str, str] | None = None,
                  bundle_sha256: str | None = None) -> Receipt:
    """The receipt in ``text``, verified; IntegrityError naming the first thing wrong.

    ``keys`` default to every pinned receipt key; ``bundle`` must be the file it
    names, ``session`` its session, and ``output`` (volume, tag) a move it states.
    """
    receipt = verify_receipt(text, PinStore().receipt_keys() if keys is None else keys)
    if session is not None and receipt.session != session:
        raise IntegrityError(f"the receipt is for session {receipt.session}, not {session}")
    if bundle is not None:
        actual = bundle_sha256 or bundle_digest(bundle)  # hashed once by a caller that has it
        if receipt.bundle_sha256 is None or not hmac.compare_digest(
                receipt.bundle_sha256.encode(), actual.encode()):
            raise IntegrityError(f"the receipt is for another bundle ({receipt.bundle_sha256}), "
                                 f"not {bundle} ({actual})")
    if output is not None:
        check_receipt_states(receipt, *output)
    return receipt


def check_receipt_states(receipt: Receipt, volume: str, tag: str) -> None:
    """The receipt must state that its run left ``volume`` at ``tag``."""
    move = receipt.outputs.get(volume)
    if move is None or move.new != tag:
        raise IntegrityError(f"the receipt does not state volume {volume} at tag {tag} "
                             f"(it states {move.new if move else 'no change of it'})")


def receipt_of_bundle(client: CasClient, address: Address, session: str,
                      bundle: Path) -> Receipt | None:
    """The CAS's receipt for ``bundle`` of ``session``, checked against the receipt key
    pinned for ``address``; None if the CAS keeps none for it."""
    key = PinStore().receipt_key(address)
    if key is None:
        raise RefusedError(f"no receipt key is pinned for the CAS at {address}: run tdapp "
                           f"cas attest {address}")
    digest = bundle_digest(bundle)
    query = urlencode({"session": session, "bundle": digest})
    try:
        answer = client.request("GET", f"/v1/receipts?{query}")
    except NotFoundError:
        return None
    return check_receipt(str(answer.get("receipt", "")), keys={thumbprint(key): key},
                         bundle=bundle, session=session, bundle_sha256=digest)

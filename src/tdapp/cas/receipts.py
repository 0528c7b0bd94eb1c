"""The CAS's receipt key: signs receipts (:mod:`tdapp.attest.receipt`) and nothing else.

An EC P-256 key of its own (not the TLS key: one key, one purpose), made on
first start as ``receipt.key`` (mode 0600, create-only, so replicas sharing a
state folder share it) and published as a public JWK at ``/v1/receipt-key``.
Must never sign anything but a :class:`~tdapp.attest.receipt.Receipt`, and never
return or log the private key.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from jwcrypto import jwk, jws

from tdapp.attest.receipt import ALGORITHM, Receipt, receipt_header, thumbprint
from tdapp.errors import InputError
from tdapp.tls import (
    ensure_private_file_mode,
    load_private_key,
    new_private_key,
    save_private_key,
)


class ReceiptSigner:
    __slots__ = ("_key", "kid")

    def __init__(self, key: jwk.JWK) -> None:
        self._key = key
        self.kid = thumbprint(key)

    def __repr__(self) -> str:
        return f"ReceiptSigner(kid={self.kid})"

    @classmethod
    def load_or_create(cls, path: Path) -> ReceiptSigner:
        if not path.exists():
            with contextlib.suppress(FileExistsError):
                save_private_key(new_private_key(), path)
        ensure_private_file_mode(path)
        try:
            return cls(jwk.JWK.from_pyca(load_private_key(path)))
        except InputError:
            raise InputError(f"{path} does not hold the CAS's receipt key (EC P-256)") from None

    def public_jwk(self) -> dict[str, Any]:
        exported: dict[str, Any] = self._key.export_public(as_dict=True)
        return exported

    def sign(self, receipt: Receipt) -> str:
        if receipt.cas_key != self.kid:
            raise ValueError("a receipt names the key that signs it")
        token = jws.JWS(receipt.payload())
        token.add_signature(self._key, alg=ALGORITHM, protected=receipt_header(self.kid))
        return str(token.serialize(compact=True))

"""The CAS's own keys: its TLS key and certificate, the client CA, the master key.

Made on first start under the CAS's state folder and kept, so a restarted CAS
presents the same certificate and clients' pins stay valid. Replicas share
them by sharing the folder's files (see docs/operations.md). Private keys are
written with mode 0600 and refused when readable by others.
"""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from tdapp.cas.receipts import ReceiptSigner
from tdapp.cas.sealing import MasterKey
from tdapp.core.atomic import WriteMode
from tdapp.errors import InputError
from tdapp.tls import (
    PrivateKey,
    ensure_private_file_mode,
    fingerprint,
    load_certificate,
    load_private_key,
    new_private_key,
    save_certificate,
    save_private_key,
    self_signed,
)


@dataclass(frozen=True)
class CasMaterials:
    state_dir: Path
    certificate: x509.Certificate
    client_ca_key: PrivateKey
    client_ca: x509.Certificate
    master_key: MasterKey
    receipt_signer: ReceiptSigner

    @property
    def certificate_path(self) -> Path:
        return self.state_dir / "cas.crt"

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.certificate)

    @classmethod
    def load_or_create(cls, state_dir: Path, *, hosts: tuple[str, ...] = (),
                       master_key_file: Path | None = None) -> CasMaterials:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        names = ("localhost", "127.0.0.1", "::1", socket.gethostname(), *hosts)
        unique_hosts = tuple(dict.fromkeys(h for h in names if h and h != "0.0.0.0"))  # noqa: S104
        _ensure_pair(state_dir / "cas.key", state_dir / "cas.crt",
                     lambda key: self_signed(key, "tdapp CAS", hosts=unique_hosts))
        _ensure_pair(state_dir / "client-ca.key", state_dir / "client-ca.crt",
                     lambda key: self_signed(key, "tdapp CAS client CA", ca=True))
        return cls(
            state_dir=state_dir,
            certificate=load_certificate(state_dir / "cas.crt"),
            client_ca_key=load_private_key(state_dir / "client-ca.key"),
            client_ca=load_certificate(state_dir / "client-ca.crt"),
            master_key=MasterKey.load_or_create(master_key_file or state_dir / "master.key"),
            receipt_signer=ReceiptSigner.load_or_create(state_dir / "receipt.key"),
        )

    def server_context(self) -> ssl.SSLContext:
        """TLS 1.2+ server context; client certificates requested, optional, CAS-issued."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.set_ciphers("ECDHE+AESGCM:ECDHE+CHACHA20")
        context.load_cert_chain(self.state_dir / "cas.crt", self.state_dir / "cas.key")
        context.load_verify_locations(self.state_dir / "client-ca.crt")
        context.verify_mode = ssl.CERT_OPTIONAL
        return context


def _ensure_pair(key_path: Path, cert_path: Path,
                 make: Callable[[PrivateKey], x509.Certificate]) -> None:
    """Make the key and its certificate once; a replica starting at the same time keeps them.

    The key is written create-only. Whoever wins writes the certificate; a
    process that lost the race waits for it rather than writing its own, which
    would not match the key.
    """
    if key_path.exists() and cert_path.exists():
        ensure_private_file_mode(key_path)
        return
    key = new_private_key()
    try:
        save_private_key(key, key_path)
    except FileExistsError:
        _wait_for(cert_path)
        ensure_private_file_mode(key_path)
        return
    save_certificate(make(key), cert_path, mode=WriteMode.CREATE_ONLY)


def _wait_for(path: Path, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        if time.monotonic() > deadline:
            raise InputError(f"{path} is missing next to its key; remove the key to make both anew")
        time.sleep(0.05)

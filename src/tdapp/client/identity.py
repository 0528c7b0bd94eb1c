"""The local user's identity: a key pair whose public-key hash is who they are to a CAS.

Made on first use under ``$TDAPP_HOME/identity``. Each CAS certifies the key
once (``POST /v1/identities``, proving possession with a CSR) and the
certificate it returns is kept next to the key, named by that CAS's
fingerprint. Must never write the private key readable by others.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

from tdapp.core.atomic import WriteMode
from tdapp.home import private_dir
from tdapp.tls import (
    PrivateKey,
    ensure_private_file_mode,
    key_hash,
    load_private_key,
    new_private_key,
    save_certificate,
    save_private_key,
    self_signed,
)


@dataclass(frozen=True)
class ClientIdentity:
    folder: Path
    key: PrivateKey

    @property
    def key_path(self) -> Path:
        return self.folder / "client.key"

    @property
    def certificate_path(self) -> Path:
        """The self-signed certificate (for tools that want one; a CAS issues its own)."""
        return self.folder / "client.crt"

    @property
    def identity(self) -> str:
        return key_hash(self.key.public_key())

    def cas_certificate_path(self, cas_fingerprint: str) -> Path:
        return self.folder / "cas" / f"{cas_fingerprint}.crt"

    def cas_certificates(self) -> list[Path]:
        folder = self.folder / "cas"
        return sorted(folder.glob("*.crt")) if folder.is_dir() else []

    @classmethod
    def load_or_create(cls) -> ClientIdentity:
        folder = private_dir("identity")
        key_path = folder / "client.key"
        if not key_path.exists():
            # Create-only: two commands starting at once must not each make an
            # identity; the loser uses the winner's key.
            with contextlib.suppress(FileExistsError):
                save_private_key(new_private_key(), key_path)
        ensure_private_file_mode(key_path)
        key = load_private_key(key_path)
        identity = cls(folder, key)
        if not identity.certificate_path.exists():
            with contextlib.suppress(FileExistsError):
                save_certificate(self_signed(key, identity.identity, client=True),
                                 identity.certificate_path, mode=WriteMode.CREATE_ONLY)
        (folder / "cas").mkdir(mode=0o700, exist_ok=True)
        return identity

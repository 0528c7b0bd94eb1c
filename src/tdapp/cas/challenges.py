"""Enclave challenge keys of iExec tasks: one secp256k1 key per session and task, never stored.

The key is derived (HKDF-SHA256, ``cryptography``) from a subkey of the master
key and the session's name and task id, so every replica derives the same key,
nothing about it is in the database, and no two tasks share one. The CAS gives
its *address* to the session's readers (the requester checks a result's
enclave signature against it) and the key itself only inside the configuration
encrypted to an attested instance. Must never return the key to a client.
"""

from __future__ import annotations

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from tdapp.cas.sealing import MasterKey
from tdapp.iexec.digest import EnclaveChallenge

_SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141


class ChallengeKeys:
    __slots__ = ("_key",)

    def __init__(self, master_key: MasterKey) -> None:
        self._key = master_key.subkey(b"iexec enclave challenges")

    def __repr__(self) -> str:
        return "ChallengeKeys(<hidden>)"

    def for_task(self, session: str, task_id: str) -> EnclaveChallenge:
        """The task's challenge key (the same for every replica and every attestation)."""
        for counter in range(256):  # a scalar outside (0, n) has probability ~2^-128
            candidate = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"\x00".join(
                (b"tdapp/v1 iexec enclave challenge", session.encode("utf-8"),
                 task_id.lower().encode("ascii"), bytes([counter])))).derive(self._key)
            if 0 < int.from_bytes(candidate, "big") < _SECP256K1_N:
                return EnclaveChallenge(candidate)
        raise AssertionError("no secp256k1 scalar in 256 derivations")

"""iExec's result digest and enclave signature, exactly as PoCo checks a TEE contribution.

Owns the formulas (all ``‖`` are byte concatenations, ``keccak`` is Keccak-256):

- web2 digest of the deterministic output: a file → ``sha256(bytes)``; a folder →
  ``keccak(sha256(f1) ‖ sha256(f2) ‖ …)`` over its top-level files in name order;
- web3 (callback) digest: ``keccak(callback bytes)``;
- ``result_hash = keccak(task_id ‖ digest)``,
  ``result_seal = keccak(worker(20) ‖ task_id(32) ‖ digest(32))``,
  ``message = keccak(result_hash ‖ result_seal)``, signed EIP-191
  (``"\\x19Ethereum Signed Message:\\n32" ‖ message``) by the enclave challenge key;

and the parsing of task ids, digests, addresses and signatures at the edges
(``0x`` hex; InputError naming the field). Verification accepts only what
PoCo's ECDSA check accepts: v 27/28 and low s (or the EIP-2098 64-byte form).
This module must never show a challenge private key in a repr or a message,
and never hash hex text where iExec hashes bytes.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import stat
from pathlib import Path
from typing import TypeAlias

from tdapp.errors import InputError, IntegrityError
from tdapp.iexec.ethereum import Account, encode_defunct, keccak

Bytes32: TypeAlias = bytes
"""32 raw bytes: a task id, a digest, a hash."""

_HEX = re.compile(r"0[xX]([0-9a-fA-F]*)")
_SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
_CHUNK = 1 << 20


# -- values at the edges ---------------------------------------------------------------


def _hex_bytes(value: str, field: str, *, prefix_optional: bool = False) -> bytes:
    text = value.strip()
    match = _HEX.fullmatch(text)
    digits = match.group(1) if match else (text if prefix_optional else None)
    if digits is None or len(digits) % 2 or not re.fullmatch(r"[0-9a-fA-F]*", digits):
        optional = "optional " if prefix_optional else ""
        raise InputError(f"{field} must be hex digits (an even number, {optional}0x first)")
    return bytes.fromhex(digits)


def parse_bytes32(value: str | bytes, field: str) -> Bytes32:
    """A task id or digest: 32 raw bytes, or ``0x`` + 64 hex digits."""
    raw = value if isinstance(value, bytes) else _hex_bytes(value, field)
    if len(raw) != 32:
        raise InputError(f"{field} must be 32 bytes (0x followed by 64 hex digits)")
    return raw


def to_hex(raw: bytes) -> str:
    """``0x`` + lower-case hex, the form iExec writes."""
    return "0x" + raw.hex()


def checksum_address(raw: bytes) -> str:
    """The EIP-55 mixed-case spelling of a 20-byte address."""
    digits = raw.hex()
    nibbles = keccak(digits.encode("ascii")).hex()
    return "0x" + "".join(char.upper() if char.isalpha() and int(nibbles[i], 16) >= 8 else char
                          for i, char in enumerate(digits))


def parse_address(value: str | bytes, field: str = "worker") -> bytes:
    """An Ethereum address: 20 raw bytes, or ``0x`` + 40 hex digits.

    A mixed-case address must carry a valid EIP-55 checksum, so that a mistyped
    digit is caught here rather than as a signature that fails to verify.
    """
    if isinstance(value, bytes):
        raw = value
    else:
        raw = _hex_bytes(value, field)
        digits = value.strip()[2:]
        if len(raw) == 20 and digits != digits.lower() and digits != digits.upper() \
                and checksum_address(raw) != "0x" + digits:
            raise InputError(f"{field} {value.strip()} has a wrong EIP-55 checksum (mistyped?)")
    if len(raw) != 20:
        raise InputError(f"{field} must be an address: 0x followed by 40 hex digits")
    return raw


def parse_signature(value: str | bytes, field: str = "signature") -> bytes:
    """A signature as PoCo accepts it: 65 bytes r ‖ s ‖ v, v 27 or 28, s in the lower half.

    The 64-byte EIP-2098 form (r ‖ yParity·2²⁵⁵ + s) is expanded to 65 bytes.
    """
    raw = value if isinstance(value, bytes) else _hex_bytes(value, field)
    if len(raw) == 64:
        vs = int.from_bytes(raw[32:], "big")
        s, parity = vs & ((1 << 255) - 1), vs >> 255
        raw = raw[:32] + s.to_bytes(32, "big") + bytes([27 + parity])
    if len(raw) != 65:
        raise InputError(f"{field} must be 65 bytes (0x followed by 130 hex digits)")
    r, s, v = int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:64], "big"), raw[64]
    if v not in (27, 28):
        raise InputError(f"{field} has v = {v}; PoCo accepts only 27 or 28")
    if not 0 < r < _SECP256K1_N or not 0 < s <= _SECP256K1_N // 2:
        raise InputError(f"{field} is not a canonical secp256k1 signature (r, s out of range)")
    return raw


# -- digests ---------------------------------------------------------------------------


def _sha256_file(path: Path) -> bytes:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while piece := handle.read(_CHUNK):
            digest.update(piece)
    return digest.digest()


def _java_order(name: str) -> bytes:
    # Java sorts File names by UTF-16 code units; big-endian UTF-16 bytes sort the same way.
    return name.encode("utf-16-be", "surrogatepass")


def web2_result_digest(path: Path) -> Bytes32:
    """The digest of a deterministic output: a file or a folder of files.

    A file: ``sha256`` of its bytes. A folder: ``keccak`` of the 32-byte
    ``sha256`` of each of its top-level entries (hidden ones too), in the
    order Java sorts their names (UTF-16 code units), concatenated; an empty
    folder hashes the empty string, as iExec's code does. iExec would hash a
    subfolder as if empty, silently, so a subfolder is refused here with
    InputError naming it, as are links and special files (at the top too).
    """
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        raise InputError(f"{path} does not exist") from None
    if stat.S_ISREG(mode):
        return _sha256_file(path)
    if not stat.S_ISDIR(mode):
        raise InputError(f"{path} is not a regular file or a folder")
    digests = []
    for entry in sorted(path.iterdir(), key=lambda item: _java_order(item.name)):
        kind = entry.lstat().st_mode
        if stat.S_ISDIR(kind):
            raise InputError(f"{entry} is a subfolder: iExec's digest covers only the files "
                             "directly in the output folder")
        if not stat.S_ISREG(kind):
            raise InputError(f"{entry} is not a regular file (links and special files "
                             "are refused)")
        digests.append(_sha256_file(entry))
    return keccak(b"".join(digests))


def callback_digest(callback_hex: str) -> Bytes32:
    """``keccak`` of the callback's bytes (``callback-data`` hex-decoded, ``0x`` optional)."""
    raw = _hex_bytes(callback_hex, "callback-data", prefix_optional=True)
    if not raw:
        raise InputError("callback-data is empty")
    return keccak(raw)


def result_hash(task_id: str | bytes, digest: str | bytes) -> Bytes32:
    """``keccak(task_id ‖ digest)``: the contribution's resultHash."""
    return keccak(parse_bytes32(task_id, "task id") + parse_bytes32(digest, "result digest"))


def result_seal(worker: str | bytes, task_id: str | bytes, digest: str | bytes) -> Bytes32:
    """``keccak(worker ‖ task_id ‖ digest)``: the contribution's resultSeal."""
    return keccak(parse_address(worker) + parse_bytes32(task_id, "task id")
                  + parse_bytes32(digest, "result digest"))


def enclave_message(task_id: str | bytes, worker: str | bytes, digest: str | bytes) -> Bytes32:
    """``keccak(result_hash ‖ result_seal)``: what the enclave challenge key signs."""
    return keccak(result_hash(task_id, digest) + result_seal(worker, task_id, digest))


# -- the enclave challenge key ---------------------------------------------------------


class EnclaveChallenge:
    """A secp256k1 enclave challenge key. Its repr shows only its address."""

    __slots__ = ("_key", "address")

    def __init__(self, private_key: bytes) -> None:
        if not isinstance(private_key, bytes) or len(private_key) != 32 \
                or not 0 < int.from_bytes(private_key, "big") < _SECP256K1_N:
            raise InputError("an enclave challenge key is 32 bytes, a secp256k1 scalar")
        self._key = private_key
        # The enclave challenge a task names: public, so it may show in a repr.
        self.address: str = Account.from_key(private_key).address

    @classmethod
    def create(cls) -> EnclaveChallenge:
        return cls(bytes(Account.create().key))

    @classmethod
    def from_hex(cls, text: str) -> EnclaveChallenge:
        try:
            raw = _hex_bytes(text, "challenge key", prefix_optional=True)
        except InputError:
            raise InputError("the enclave challenge key must be 64 hex digits") from None
        return cls(raw)

    def private_key_hex(self) -> str:
        """The private key as ``0x`` hex (what the SMS hands the post-compute enclave)."""
        return to_hex(self._key)

    def sign(self, message: Bytes32) -> bytes:
        """EIP-191 personal signature of the 32 bytes ``message``: 65 bytes, v 27/28, low s."""
        signed = Account.sign_message(encode_defunct(primitive=message), self._key)
        return bytes(signed.signature)

    def __repr__(self) -> str:
        return f"EnclaveChallenge({self.address})"

    def __reduce__(self) -> str:
        raise TypeError("an EnclaveChallenge cannot be pickled")


def _challenge(key: EnclaveChallenge | bytes | str) -> EnclaveChallenge:
    if isinstance(key, EnclaveChallenge):
        return key
    return EnclaveChallenge(key) if isinstance(key, bytes) else EnclaveChallenge.from_hex(key)


def sign_result(challenge_private_key: EnclaveChallenge | bytes | str, task_id: str | bytes,
                worker: str | bytes, digest: str | bytes) -> bytes:
    """The enclave signature of a result: 65 bytes, as ``computed.json``'s enclave-signature."""
    return _challenge(challenge_private_key).sign(enclave_message(task_id, worker, digest))


def recover_signer(task_id: str | bytes, worker: str | bytes, digest: str | bytes,
                   signature: str | bytes) -> str:
    """The EIP-55 address that made ``signature`` over this result (InputError if malformed)."""
    message = encode_defunct(primitive=enclave_message(task_id, worker, digest))
    raw = parse_signature(signature)
    try:
        return str(Account.recover_message(message, signature=raw))
    except Exception:
        # eth-account raises ValueError, eth_keys BadSignature or eth_utils
        # ValidationError for a signature that recovers no key: all mean the same.
        raise InputError("signature recovers no key (not a signature of this result)") from None


def check_signer(task_id: str | bytes, worker: str | bytes, digest: str | bytes,
                 signature: str | bytes, address: str | bytes) -> str:
    """IntegrityError unless ``signature`` over this result recovers ``address``; returns it."""
    expected = checksum_address(parse_address(address, "address"))
    signer = recover_signer(task_id, worker, digest, signature)
    if not hmac.compare_digest(signer.lower(), expected.lower()):
        raise IntegrityError(f"the signature was made by {signer}, not {expected} "
                             "(another key, task, worker or result)")
    return signer

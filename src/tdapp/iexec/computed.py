"""iExec's ``computed.json``: what an app declares about its output, and the enclave's seal on it.

Owns the file's keys and their meaning, as iexec-common's ``ComputedFile``:

- written by the app in ``/iexec_out/computed.json``: ``deterministic-output-path``
  (web2: the file or folder under ``/iexec_out`` whose digest is the result) or
  ``callback-data`` (web3: hex bytes handed to the requester's contract);
- filled after by the post-compute enclave: ``task-id``, ``result-digest``,
  ``enclave-signature`` (all ``0x`` hex).

Unknown keys are ignored and absent or null ones are None, as iExec's Jackson
mapping does; written files list only the keys that are set, in the order
above. This module must never resolve a deterministic-output-path outside the
output folder it is given.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath

from tdapp.errors import InputError
from tdapp.iexec.digest import (
    EnclaveChallenge,
    callback_digest,
    parse_address,
    parse_bytes32,
    parse_signature,
    sign_result,
    to_hex,
    web2_result_digest,
)

FILE_NAME = "computed.json"
IEXEC_OUT = PurePosixPath("/iexec_out")
"""Where the app's output folder is inside the container; deterministic paths start here."""
_KEYS = ("deterministic-output-path", "callback-data", "task-id", "result-digest",
         "enclave-signature")
_MAX_BYTES = 1 << 20


@dataclass(frozen=True)
class ComputedFile:
    """The content of a ``computed.json``; every field is iExec's text or None."""

    deterministic_output_path: str | None = None
    callback_data: str | None = None
    task_id: str | None = None
    result_digest: str | None = None
    enclave_signature: str | None = None

    def __post_init__(self) -> None:
        if self.callback_data is not None:
            callback_digest(self.callback_data)  # hex, and not empty
        if self.task_id is not None:
            parse_bytes32(self.task_id, "task-id")
        if self.result_digest is not None:
            parse_bytes32(self.result_digest, "result-digest")
        if self.enclave_signature is not None:
            parse_signature(self.enclave_signature, "enclave-signature")

    @property
    def is_callback(self) -> bool:
        """Web3 mode: the result is the callback, not the output files."""
        return self.callback_data is not None

    def to_json(self) -> bytes:
        """The file's bytes: the keys that are set, in iExec's order."""
        values = (self.deterministic_output_path, self.callback_data, self.task_id,
                  self.result_digest, self.enclave_signature)
        return json.dumps({key: value for key, value in zip(_KEYS, values, strict=True)
                           if value is not None}).encode("utf-8")


def computed_json(*, deterministic_output_path: str | None = None,
                  callback_data: str | None = None, task_id: str | None = None,
                  result_digest: str | None = None,
                  enclave_signature: str | None = None) -> bytes:
    """The bytes of a ``computed.json`` with these keys (the unset ones left out)."""
    return ComputedFile(deterministic_output_path, callback_data, task_id, result_digest,
                        enclave_signature).to_json()


def parse_computed_json(data: bytes | str) -> ComputedFile:
    """A ``computed.json``'s content; InputError naming the key that is malformed."""
    if len(data) > _MAX_BYTES:
        raise InputError(f"{FILE_NAME} is larger than {_MAX_BYTES} bytes")
    try:
        document = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise InputError(f"{FILE_NAME} is not JSON") from None
    if not isinstance(document, dict):
        raise InputError(f"{FILE_NAME} must be a JSON object")
    values: list[str | None] = []
    for key in _KEYS:
        value = document.get(key)
        if value is not None and not isinstance(value, str):
            raise InputError(f"{FILE_NAME}: {key} must be a string")
        values.append(value)
    computed = ComputedFile(*values)
    if computed.deterministic_output_path is None and computed.callback_data is None:
        raise InputError(f"{FILE_NAME} names neither deterministic-output-path nor callback-data")
    return computed


def read_computed_json(path: Path) -> ComputedFile:
    """:func:`parse_computed_json` of the file at ``path``."""
    try:
        return parse_computed_json(path.read_bytes())
    except FileNotFoundError:
        raise InputError(f"{path} does not exist (the app wrote no {FILE_NAME})") from None


def deterministic_path(computed: ComputedFile, iexec_out: Path) -> Path:
    """Where ``deterministic-output-path`` (``/iexec_out/…``) is in the folder ``iexec_out``."""
    text = computed.deterministic_output_path
    if not text:
        raise InputError(f"{FILE_NAME}: deterministic-output-path is empty")
    declared = PurePosixPath(text)
    if not declared.is_absolute() or declared.parts[:2] != IEXEC_OUT.parts \
            or ".." in declared.parts:
        raise InputError(f"{FILE_NAME}: deterministic-output-path {text!r} is not under "
                         f"{IEXEC_OUT}")
    local = iexec_out.joinpath(*declared.parts[2:])
    # A link inside the folder must not lead the digest to files outside it.
    if not local.resolve().is_relative_to(iexec_out.resolve()):
        raise InputError(f"{FILE_NAME}: deterministic-output-path {text!r} leads outside "
                         f"{iexec_out}")
    return local


def result_digest(computed: ComputedFile, iexec_out: Path) -> bytes:
    """The result digest iExec computes for ``computed``: web3 if it has a callback, else web2."""
    if computed.callback_data is not None:
        return callback_digest(computed.callback_data)
    return web2_result_digest(deterministic_path(computed, iexec_out))


def seal_computed(computed: ComputedFile, *, iexec_out: Path, task_id: str,
                  worker: str, challenge: EnclaveChallenge) -> ComputedFile:
    """``computed`` with task-id, result-digest and enclave-signature filled, as post-compute."""
    parse_address(worker)
    digest = result_digest(computed, iexec_out)
    signature = sign_result(challenge, task_id, worker, digest)
    return replace(computed, task_id=to_hex(parse_bytes32(task_id, "task-id")),
                   result_digest=to_hex(digest), enclave_signature=to_hex(signature))

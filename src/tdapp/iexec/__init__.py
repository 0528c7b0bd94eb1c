"""iExec's formats, byte for byte: datasets, encrypted results, digests, enclave signatures.

Owns the data formats iExec's workers, SDK and PoCo contracts exchange, so that
a tdapp DApp can take an iExec dataset as input and hand back a result iExec's
tools open and PoCo accepts (docs/iexec.md, "Formats"):

- :mod:`tdapp.iexec.dataset`: ``IV ‖ AES-256-CBC`` dataset files and their checksum;
- :mod:`tdapp.iexec.result`: the result zip, its RSA/AES encryption for the
  beneficiary (and the 2020 format), safe unpacking;
- :mod:`tdapp.iexec.digest`: the result digest, resultHash/resultSeal and the
  enclave challenge signature;
- :mod:`tdapp.iexec.computed`: ``computed.json``.

It sits beside tdapp.policy and tdapp.volume in the layers: it may import only
tdapp.errors, tdapp.core, tdapp.home and third-party libraries, and must never
talk to a chain, an SMS or any service: formats only.
"""

from __future__ import annotations

from tdapp.iexec.computed import (
    ComputedFile,
    computed_json,
    parse_computed_json,
    read_computed_json,
    seal_computed,
)
from tdapp.iexec.dataset import (
    DatasetKey,
    check_checksum,
    dataset_checksum,
    decrypt_dataset,
    decrypt_dataset_file,
    encrypt_dataset,
    encrypt_dataset_file,
    generate_dataset_key,
)
from tdapp.iexec.digest import (
    EnclaveChallenge,
    callback_digest,
    check_signer,
    enclave_message,
    recover_signer,
    result_hash,
    result_seal,
    sign_result,
    web2_result_digest,
)
from tdapp.iexec.result import (
    decrypt_result,
    encrypt_result,
    generate_beneficiary_key,
    pack_result,
    unpack_result,
)

__all__ = [
    "ComputedFile",
    "DatasetKey",
    "EnclaveChallenge",
    "callback_digest",
    "check_checksum",
    "check_signer",
    "computed_json",
    "dataset_checksum",
    "decrypt_dataset",
    "decrypt_dataset_file",
    "decrypt_result",
    "enclave_message",
    "encrypt_dataset",
    "encrypt_dataset_file",
    "encrypt_result",
    "generate_beneficiary_key",
    "generate_dataset_key",
    "pack_result",
    "parse_computed_json",
    "read_computed_json",
    "recover_signer",
    "result_hash",
    "result_seal",
    "seal_computed",
    "sign_result",
    "unpack_result",
    "web2_result_digest",
]

"""The Ethereum libraries tdapp.iexec uses (eth-account, eth-hash), imported safely.

Importing eth-account imports py_ecc, which raises the interpreter's recursion
limit to 100,000 for the whole process. With that limit, a deeply nested JSON
document or YAML mapping overflows the C stack and kills the process (a CAS
handling a hostile request, a client reading a hostile file) instead of raising
RecursionError, which every parser in tdapp turns into one clear refusal. So
the limit is put back right after the import; signing and recovery do not need
it. Import these names from here, never from the libraries directly.
"""

from __future__ import annotations

import sys

_LIMIT = sys.getrecursionlimit()
try:
    from eth_account import Account
    from eth_account.messages import encode_defunct
    from eth_hash.auto import keccak
finally:
    sys.setrecursionlimit(_LIMIT)

__all__ = ["Account", "encode_defunct", "keccak"]

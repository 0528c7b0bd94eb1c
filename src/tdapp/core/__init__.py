"""Low-level primitives every other part shares: addresses, atomic writes, canonical JSON.

Owns the one implementation of each, so that every file tdapp writes has the
same crash guarantees and every hash or signature is taken over the same bytes.
Must never import any other part of tdapp except :mod:`tdapp.errors`: it is the
bottom layer of the import contracts in ``pyproject.toml``.
"""

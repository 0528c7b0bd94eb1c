"""Sealing a session's secret values for the database, bound to exactly one revision.

The values the CAS makes or is given for a session (:mod:`tdapp.cas.secret_values`)
are sealed under the master key with the session's name, creator and hash as
associated data: whoever can write the database, without the master key, can
neither read them nor move them to another session or to another revision of
the same session. This module must never log, return or store a value unsealed.
"""

from __future__ import annotations

from collections.abc import Mapping

from tdapp.cas.sealing import MasterKey
from tdapp.cas.secret_values import SecretValue, values_from_json, values_to_json


class SecretSealer:
    __slots__ = ("_master_key",)

    def __init__(self, master_key: MasterKey) -> None:
        self._master_key = master_key

    def __repr__(self) -> str:
        return "SecretSealer(<hidden>)"

    def seal(self, values: Mapping[str, SecretValue], name: str, creator: str,
             digest: str) -> bytes | None:
        """The sealed values of one revision; None when the session has none."""
        if not values:
            return None
        return self._master_key.seal(values_to_json(values), _context(name, creator, digest))

    def unseal(self, sealed: bytes | None, name: str, creator: str,
               digest: str) -> dict[str, SecretValue]:
        """The values of one revision (IntegrityError if they were not sealed for it)."""
        if sealed is None:
            return {}
        return values_from_json(self._master_key.unseal(sealed, _context(name, creator, digest)))


def _context(name: str, creator: str, digest: str) -> bytes:
    return b"\x00".join((b"tdapp/v1 session secrets", name.encode("utf-8"),
                         creator.encode("ascii"), digest.encode("ascii")))

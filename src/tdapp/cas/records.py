"""MACs that bind the CAS's volume-tag and instance rows to its master key.

A volume's current tag decides which state of the volume a run may open, and
an instance row decides whose tag reports are accepted, so whoever can write
the database but does not hold the master key must not be able to change or
invent either. Every such row carries an HMAC-SHA256, under a subkey of the
master key, over what the row is: for a tag the session, the volume, the tag
and its version (1 when the volume entered the session, one more with each
accepted change); for an instance its token hash, session, service,
measurement and expiry. :class:`RecordMacs` makes these MACs and checks them
in constant time; a row without one (stored before tags were sealed, or
written outside the CAS) or with a wrong one is refused with
:class:`~tdapp.errors.IntegrityError`, never repaired or re-sealed.

What a MAC cannot show: a whole row put back to an older authentic copy of
itself (from a backup, or saved by the database writer). Its version is then
lower than the last one the audit log records for that volume (every accepted
tag change is logged with its version), which is how an operator detects it.
This module never returns or logs its key.
"""

from __future__ import annotations

import hmac
from hashlib import sha256

from tdapp.cas.sealing import MasterKey
from tdapp.cas.store import StoredInstance, StoredTag
from tdapp.core.canonical import canonical_json
from tdapp.errors import IntegrityError

FIRST_VERSION = 1


class RecordMacs:
    __slots__ = ("_key",)

    def __init__(self, master_key: MasterKey) -> None:
        self._key = master_key.subkey(b"record macs")

    def __repr__(self) -> str:
        return "RecordMacs(<hidden>)"

    # -- volume tags ---------------------------------------------------------------

    def first_tag(self, session: str, volume: str, tag: str | None) -> StoredTag:
        """The row of a volume that enters the session (created, or added by an update)."""
        return self._tag(session, volume, tag, FIRST_VERSION)

    def next_tag(self, current: StoredTag, tag: str) -> StoredTag:
        """The row that replaces ``current`` (already checked) when an instance moves it."""
        return self._tag(current.session, current.volume, tag, current.version + 1)

    def check_tag(self, row: StoredTag) -> StoredTag:
        """``row`` if the CAS wrote it; IntegrityError naming the volume otherwise."""
        expected = self._tag_mac(row.session, row.volume, row.tag, row.version)
        what = f"the stored tag of volume {row.volume!r} of session {row.session!r}"
        _check(row.mac, expected, what)
        return row

    def _tag(self, session: str, volume: str, tag: str | None, version: int) -> StoredTag:
        return StoredTag(session, volume, tag, version,
                         self._tag_mac(session, volume, tag, version))

    def _tag_mac(self, session: str, volume: str, tag: str | None, version: int) -> str:
        return self._mac(["volume-tag", session, volume, tag, version])

    # -- instances -----------------------------------------------------------------

    def instance_mac(self, token_hash: str, session: str, service: str, measurement: str,
                     expires_at: float, details: str | None = None) -> str:
        # float.hex: exact, so the value read back from either database gives the same MAC.
        # The details (what its receipt states) are covered when the row has them.
        fields: list[object] = ["instance", token_hash, session, service, measurement,
                                expires_at.hex()]
        return self._mac(fields if details is None else [*fields, details])

    def check_instance(self, row: StoredInstance) -> StoredInstance:
        expected = self.instance_mac(row.token_hash, row.session, row.service,
                                     row.measurement, row.expires_at, row.details)
        _check(row.mac, expected, f"the stored instance record of this token "
                                  f"(session {row.session!r}, service {row.service!r})")
        return row

    def _mac(self, fields: list[object]) -> str:
        return hmac.new(self._key, canonical_json(fields), sha256).hexdigest()


def _check(stored: str | None, expected: str, what: str) -> None:
    if stored is None:
        raise IntegrityError(f"{what} failed its integrity check: it has no MAC (stored "
                             "before records were sealed, or written outside the CAS); "
                             "the CAS will not use it")
    if not hmac.compare_digest(stored.encode("ascii", "replace"), expected.encode("ascii")):
        raise IntegrityError(f"{what} failed its integrity check: it was changed outside "
                             "the CAS; the CAS will not use it")

"""The rows the CAS store reads and writes, as plain values.

Shared by :mod:`tdapp.cas.store` (which stores them) and the authorities (which
decide about them). Values only: nothing here touches the database or a key.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any


@dataclass(frozen=True)
class StoredSession:
    name: str
    hash: str
    creator: str
    revision: int
    sealed_document: bytes
    sealed_secrets: bytes | None = None


@dataclass(frozen=True)
class SessionSummary:
    name: str
    hash: str
    revision: int
    created_at: float
    updated_at: float


@dataclass(frozen=True)
class SpentNonce:
    digest: str
    session: str
    service: str
    expires_at: float


@dataclass(frozen=True)
class StoredTag:
    """One volume's current tag row: the tag, its version and the MAC over both."""

    session: str
    volume: str
    tag: str | None
    version: int
    mac: str | None


@dataclass(frozen=True)
class NewInstance:
    token_hash: str
    measurement: str
    expires_at: float
    mac: str
    details: str | None = None  # canonical JSON of what its receipt will state


@dataclass(frozen=True)
class StoredInstance:
    token_hash: str
    session: str
    service: str
    measurement: str
    expires_at: float
    mac: str | None
    details: str | None = None


@dataclass(frozen=True)
class TagSwap:
    """One tag row to replace by its successor, in a run's commit."""

    current: StoredTag
    new: StoredTag


class Outcome(StrEnum):
    """What the CAS decided, as the audit log records it."""

    ACCEPTED = "accepted"
    REFUSED = "refused"


@dataclass(frozen=True)
class AuditEntry:
    event: str
    outcome: Outcome
    reason: str


@dataclass(frozen=True)
class AuditEvent:
    id: int
    at: float
    session: str | None
    event: str
    actor: str | None
    outcome: Outcome
    reason: str

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, "at": self.at, "session": self.session, "event": self.event,
                "actor": self.actor, "outcome": self.outcome, "reason": self.reason}

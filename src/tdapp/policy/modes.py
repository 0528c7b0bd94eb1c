"""Fixing a session's attestation mode when it is stored: :func:`with_fixed_mode`.

The mode a session is judged by must be the mode its hash covers. So the CAS
writes it into the session before hashing and storing it: a document that names
no mode gets its predecessor's mode and platforms (for an update) or the CAS's
default (for a new session), and a ``sim`` session that names no platform gets
the LAS platforms the CAS trusts. The client computes the same to predict a
session's hash (``tdapp session hash FILE``). This module is pure: it must
never pick a default on its own, nor leave a ``sim`` session without platforms.
"""

from __future__ import annotations

from tdapp.policy.errors import SessionError
from tdapp.policy.model import Session
from tdapp.policy.security import AttestationMode

# A session stored before modes were fixed at creation: the strict mode.
LEGACY_MODE = AttestationMode.HARDWARE


def with_fixed_mode(session: Session, *, predecessor: Session | None,
                    default: AttestationMode, trusted_platforms: tuple[str, ...],
                    source: str = "session") -> Session:
    """``session`` with the attestation mode (and for sim, the platforms) stated in it."""
    attestation = session.security.attestation
    mode, platforms = attestation.mode, attestation.platforms
    if mode is None and predecessor is not None:
        previous = predecessor.security.attestation
        mode = previous.mode or LEGACY_MODE
        platforms = platforms or previous.platforms
    if mode is None:
        mode = default
    if mode is AttestationMode.SIM and not platforms:
        platforms = tuple(sorted({platform.lower() for platform in trusted_platforms}))
        if not platforms:
            raise SessionError(
                "mode sim accepts evidence only from the LAS platforms the session names, "
                "and this CAS trusts no LAS to fill them in; add platforms: [ID] "
                "(tdapp las platform prints a LAS's id)", source=source,
                path="security.attestation.platforms")
    if (mode, platforms) == (attestation.mode, attestation.platforms):
        return session
    fixed = attestation.model_copy(update={"mode": mode, "platforms": tuple(platforms)})
    security = session.security.model_copy(update={"attestation": fixed})
    return session.model_copy(update={"security": security})

"""The session hash: what an update must name as its predecessor.

SHA-256 over canonical JSON (sorted keys, no whitespace, UTF-8) of
``{"session": <normalized content>, "creator": <creator identity>}``. The
content is :meth:`Session.to_canonical`, so formatting, key order, quoting and
the order of set-like lists never change the hash, while any change of content
or of creator does. This module must never hash anything but that canonical
form: the CAS, the client and the audit log all compare these values.
"""

from __future__ import annotations

import hashlib

from tdapp.core.canonical import canonical_json
from tdapp.policy.access import Identity
from tdapp.policy.model import Session


def session_hash(session: Session, creator: Identity) -> str:
    """The 64-hex hash of ``session`` as created by ``creator``."""
    if not isinstance(creator, str):
        raise TypeError("creator must be an identity string")
    document = {"session": session.to_canonical(), "creator": creator}
    return hashlib.sha256(canonical_json(document)).hexdigest()

"""Sessions (security policies): parsing, templates, normalization, hashing, access.

Owns the session language, SCONE's, as tdapp accepts it: both the 2018 form
(``digest: create``, ``tags``, ``mrenclaves`` on images) and the current
``version: "0.3"`` form normalize to one immutable :class:`Session`. Must never
accept a key it does not understand, silently drop a value, or raise anything
but :class:`SessionError` for a bad document.

- :func:`parse_session` — YAML text to a validated :class:`Session`
- :func:`fill_template`, :func:`template_variables` — ``$VARS`` in templates
- :func:`session_hash` — the hash an update names as its predecessor
- :class:`AccessPolicy` — who may read, update or create nested sessions
"""

from tdapp.policy.access import AccessPolicy, Action, Identity, certificate_identity
from tdapp.policy.errors import SessionError
from tdapp.policy.hashing import session_hash
from tdapp.policy.model import Image, ImageVolume, InjectionFile, Session, Volume
from tdapp.policy.parse import parse_session
from tdapp.policy.secrets import Secret
from tdapp.policy.security import Attestation, Security
from tdapp.policy.services import AttestationVariant, Service, Signer, split_command
from tdapp.policy.template import fill_template, template_variables

__all__ = [
    "AccessPolicy",
    "Action",
    "Attestation",
    "AttestationVariant",
    "Identity",
    "Image",
    "ImageVolume",
    "InjectionFile",
    "Secret",
    "Security",
    "Service",
    "Session",
    "SessionError",
    "Signer",
    "Volume",
    "certificate_identity",
    "fill_template",
    "parse_session",
    "session_hash",
    "split_command",
    "template_variables",
]

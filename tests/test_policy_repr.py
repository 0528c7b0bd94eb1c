"""Keys in a session never show in its repr: a log line or a traceback with a
Session, Volume, Service or Secret in it carries no key, secret or credential.

The attacker reads logs: every literal key material a document can hold is
planted, the parsed session (and each of its parts) is printed with ``repr``
and ``str``, and none of it may appear. ``to_canonical`` (what the hash covers
and the CAS seals) still has the values.
"""

from __future__ import annotations

import yaml
from cas_fixtures import SessionDoc

from tdapp.policy import parse_session

OTP = "JBSWY3DPEHPK3PXP" * 2


def planted() -> tuple[str, dict[str, str]]:
    doc = SessionDoc("repr-test", secret="API-TOKEN-a5f0c2", injected="pw=INJECTED-77e1")
    document = doc.as_dict()
    document["services"][0].update(fspf_path="/fspf.pb", fspf_key="5e" * 32,
                                   fspf_tag="6f" * 16, one_time_password_shared_secret=OTP)
    document["security"] = {"service_access_token": "ACCESS-TOKEN-91b2",
                            "attestation": {"one_time_password_shared_secret": OTP}}
    document["secrets"] = [
        {"name": "api_key", "kind": "ascii", "value": "SECRET-VALUE-3c4d"},
        {"name": "aad", "kind": "aad-token", "tenant_id": "t", "client_id": "c",
         "application_secret": "APP-SECRET-8e9f"}]
    needles = {f"{name} key": key for name, key in doc.keys.items()}
    needles |= {"service main FSPF key": "5e" * 32, "otp": OTP,
                "environment value": "API-TOKEN-a5f0c2", "injected content": "INJECTED-77e1",
                "access token": "ACCESS-TOKEN-91b2", "secret value": "SECRET-VALUE-3c4d",
                "application secret": "APP-SECRET-8e9f"}
    return yaml.safe_dump(document, sort_keys=False), needles


def test_no_key_or_secret_in_any_repr() -> None:
    text, needles = planted()
    session = parse_session(text)
    shown = [repr(session), str(session), *map(repr, session.volumes),
             *map(repr, session.services), *map(repr, session.secrets),
             *map(repr, session.images), repr(session.security)]
    leaked = sorted({what for what, needle in needles.items() for view in shown
                     if needle.lower() in view.lower()})
    assert leaked == []
    # The values are all still there for the hash and the sealed copy.
    canonical = repr(session.to_canonical())
    assert all(needle in canonical for needle in needles.values())
    assert "fspf_tag" in repr(session.volumes[0])  # public values still show

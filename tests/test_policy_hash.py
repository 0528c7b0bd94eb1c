"""The session hash: independent of formatting, dependent on content and creator."""

from __future__ import annotations

import hashlib
import json

from tdapp.policy import parse_session, session_hash

CREATOR = "ab" * 32
MRENCLAVE_A = "e0f45a9a862c83f383730cc2aef144081025e3f925615da5b35c4d980faaa3c9"
MRENCLAVE_B = "dcfa00f40a4e244a63b50ab1033a47105b79774cd83771c45d2a82def0ab9034"

BLOCK = f"""\
name: hashed
version: "0.3"
services:
  - name: app
    mrenclaves:
      - {MRENCLAVE_A}
      - {MRENCLAVE_B}
    command: /app
    environment:
      LEVEL: 7
      MODE: hw
security:
  attestation:
    tolerate: [outdated-tcb, debug-mode]
"""

# The same content: flow style, other key order, quoting, comments, list order,
# upper-case hex, explicit defaults.
FLOW = f"""\
# a comment
security: {{attestation: {{tolerate: ["debug-mode", outdated-tcb, debug-mode]}}}}
version: 0.3
services: [{{name: 'app', command: "/app", environment: {{MODE: hw, LEVEL: "7"}},
             mrenclaves: [{MRENCLAVE_B.upper()}, {MRENCLAVE_A}]}}]
name: "hashed"
predecessor: ~
access_policy: {{read: [CREATOR], update: [CREATOR]}}
volumes: []
"""


def digest(text: str, creator: str = CREATOR) -> str:
    return session_hash(parse_session(text), creator)


def test_formatting_does_not_change_the_hash() -> None:
    assert parse_session(BLOCK) == parse_session(FLOW)
    assert digest(BLOCK) == digest(FLOW)
    assert digest(BLOCK) == digest(parse_session(BLOCK).to_yaml())


def test_content_changes_the_hash() -> None:
    base = digest(BLOCK)
    assert digest(BLOCK.replace("MODE: hw", "MODE: sim")) != base
    assert digest(BLOCK.replace("command: /app", "command: /app -v")) != base
    assert digest(BLOCK.replace("name: hashed", "name: hashed2")) != base
    assert digest(BLOCK + f"predecessor: {'1' * 64}\n") != base
    assert digest(BLOCK.replace(f"      - {MRENCLAVE_B}\n", "")) != base


def test_creator_changes_the_hash() -> None:
    assert digest(BLOCK, CREATOR) != digest(BLOCK, "cd" * 32)


def test_hash_is_sha256_of_canonical_json() -> None:
    session = parse_session(BLOCK)
    document = {"session": session.to_canonical(), "creator": CREATOR}
    encoded = json.dumps(document, sort_keys=True, separators=(",", ":"),
                         ensure_ascii=False).encode("utf-8")
    assert session_hash(session, CREATOR) == hashlib.sha256(encoded).hexdigest()
    assert session.to_canonical()["version"] == "0.3"
    assert "predecessor" not in session.to_canonical()  # null is the default: left out


def test_redacted_form_hides_literal_keys_and_secret_values() -> None:
    key, otp = "5e" * 32, "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"
    session = parse_session(f"""\
name: redacted
volumes:
  - name: v
    fspf_key: {key}
    fspf_tag: {"7a" * 16}
services:
  - name: app
    mrenclaves: [{"ab" * 32}]
    one_time_password_shared_secret: $$SCONE::otp$$
security:
  service_access_token: token-value-123
  attestation:
    one_time_password_shared_secret: {otp}
secrets:
  - name: pw
    kind: ascii
    value: hunter2-hunter2
  - name: otp
    kind: binary
    size: 16
""")
    shown = session.to_yaml(redact_secrets=True)
    for secret in (key, otp, "token-value-123", "hunter2-hunter2"):
        assert secret not in shown
        assert secret in session.to_yaml()
    assert "7a" * 16 in shown                       # tags are not secret
    assert "$$SCONE::otp$$" in shown                # references are not secret
    assert session.to_canonical(redact_secrets=True)["volumes"][0]["fspf_key"] == "<redacted>"
    assert session.to_canonical()["volumes"][0]["fspf_key"] == key

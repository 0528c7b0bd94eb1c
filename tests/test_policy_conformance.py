"""Conformance: the 33 SCONE session documents of shared/testdata/conformance/sessions.

Each is parsed as a user would submit it. Files named INVALID or SUSPECT must be
refused with a line and a key path; the others parse, except three published
forms tdapp cannot honour, which are refused with the reason (an attestation
variant given as a placeholder; a signed policy's ``creator.signer``). Whether a
parsed one is also enforceable is tests/test_session_enforced.py's question.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tdapp.policy import SessionError, parse_session, session_hash

FOLDER = Path(__file__).resolve().parents[2] / "shared" / "testdata" / "conformance" / "sessions"
FILES = sorted(FOLDER.glob("*.yml"))
REFUSED_FORMS = {
    "03": ("services[0].attestation[0]", "placeholder"),
    "05": ("services[0].attestation[0]", "placeholder"),
    "07": ("creator", "creator.signer"),
}
if len(FILES) != 33:
    pytest.skip(f"conformance sessions not found at {FOLDER}", allow_module_level=True)


def _bad(path: Path) -> bool:
    return "-INVALID-" in path.name or "-SUSPECT-" in path.name


@pytest.mark.parametrize("path", [p for p in FILES if not _bad(p)
                                  and p.name[:2] not in REFUSED_FORMS],
                         ids=lambda p: p.name[:2])
def test_published_sessions_parse_and_round_trip(path: Path) -> None:
    session = parse_session(path.read_text(encoding="utf-8"), source=path.name)
    assert parse_session(session.to_yaml()) == session
    assert session_hash(session, "4f" * 32) == session_hash(
        parse_session(session.to_yaml()), "4f" * 32)


@pytest.mark.parametrize("path", [p for p in FILES if _bad(p)], ids=lambda p: p.name[:2])
def test_invalid_and_suspect_documents_are_refused_with_a_line(path: Path) -> None:
    with pytest.raises(SessionError) as caught:
        parse_session(path.read_text(encoding="utf-8"), source=path.name)
    assert caught.value.line is not None and caught.value.path
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("number", sorted(REFUSED_FORMS))
def test_forms_tdapp_cannot_honour_are_refused_with_the_reason(number: str) -> None:
    (path,) = [p for p in FILES if p.name.startswith(f"{number}-")]
    with pytest.raises(SessionError) as caught:
        parse_session(path.read_text(encoding="utf-8"), source=path.name)
    where, word = REFUSED_FORMS[number]
    assert caught.value.path == where and word in caught.value.detail

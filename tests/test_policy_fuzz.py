"""Property: whatever text arrives, parse_session returns a Session or raises SessionError.

And whatever it returns round-trips through to_yaml and hashes.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tdapp.policy import Session, SessionError, parse_session, session_hash

FUZZ = settings(max_examples=200, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# Keys of the session language, so that random documents reach the deeper rules.
WORDS = ["name", "version", "predecessor", "digest", "services", "volumes", "images",
         "secrets", "access_policy", "security", "attestation", "mode", "tolerate",
         "ignore_advisories", "read", "update", "create_sessions", "environment", "command",
         "pwd", "image_name", "mrenclaves", "mrenclave", "signer", "mrsigner", "isvprodid",
         "fspf_key", "fspf_tag", "fspf_path", "path", "kind", "value", "size", "export",
         "import", "session", "secret", "injection_files", "content", "tags", "CREATOR",
         "ANY", "NONE", "hardware", "sim", "debug-mode", "x509", "ascii", "*", "/in", "0.3",
         "$$SCONE::x$$", "\\@\\@HOST", "a" * 64, "b" * 32]

scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True),
                    st.sampled_from(WORDS), st.text(max_size=20))
keys = st.one_of(st.sampled_from(WORDS), st.text(max_size=8))
documents = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=5)), max_leaves=30)


def check(text: str) -> None:
    try:
        session = parse_session(text, source="fuzz")
    except SessionError as error:
        assert "\n" not in str(error)
        return
    assert isinstance(session, Session)
    assert parse_session(session.to_yaml()) == session
    assert len(session_hash(session, "00" * 32)) == 64


@FUZZ
@given(st.text(max_size=300))
def test_arbitrary_text(text: str) -> None:
    check(text)


@FUZZ
@given(documents)
def test_arbitrary_yaml_structures(data: object) -> None:
    check(yaml.safe_dump(data, allow_unicode=True))


@FUZZ
@given(st.dictionaries(st.sampled_from(WORDS), documents, max_size=6))
def test_session_shaped_documents(sections: dict[str, object]) -> None:
    check(yaml.safe_dump({"name": "fuzz", **sections}, allow_unicode=True))


CORPUS = sorted((Path(__file__).resolve().parents[2] / "shared" / "testdata"
                 / "scone-sessions").glob("*.yml"))


@FUZZ
@given(st.data())
def test_damaged_corpus_documents(data: st.DataObject) -> None:
    if not CORPUS:
        return
    text = data.draw(st.sampled_from(CORPUS)).read_text(encoding="utf-8")
    start = data.draw(st.integers(0, len(text)))
    end = data.draw(st.integers(start, min(len(text), start + 40)))
    check(text[:start] + data.draw(st.text(max_size=10)) + text[end:])


texts = st.text(st.characters(blacklist_categories=["Cs"]), max_size=30)


@FUZZ
@given(environment=st.dictionaries(texts, st.one_of(st.none(), texts, scalars), max_size=4),
       command=texts, content=texts, fragment=documents, value=texts)
def test_valid_sessions_with_arbitrary_text_round_trip(environment: dict[str, object],
                                                       command: str, content: str,
                                                       fragment: object, value: str) -> None:
    document = {
        "name": "round-trip",
        "services": [{"name": "app", "image_name": "img", "mrenclaves": ["ab" * 32],
                      "command": command, "environment": environment}],
        "images": [{"name": "img", "injection_files": [{"path": "/etc/f", "content": content}]}],
        "secrets": [{"name": "fragment", "kind": "config-fragment", "value": fragment},
                    {"name": "text", "kind": "ascii", "value": value}],
    }
    check(yaml.safe_dump(document, allow_unicode=True))

"""``tdapp cas audit`` reads the decisions back from the CAS's own database."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tdapp.cas.store import Store, database_url
from tdapp.cli import run


def test_operator_reads_every_decision_with_its_reason(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = Store(database_url(None, tmp_path))
    store.migrate()
    store.record("s1", "session.read", "ab" * 32, "refused", "may not read (access_policy.read)")
    store.record(None, "session.create", None, "refused", "session:3: unknown key 'x'")
    store.close()

    assert run(["cas", "audit", "--state-dir", str(tmp_path), "--json"]) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(e["session"], e["outcome"]) for e in events] == [("s1", "refused"),
                                                              (None, "refused")]
    assert "unknown key 'x'" in events[1]["reason"]

    assert run(["cas", "audit", "--state-dir", str(tmp_path), "--session", "s1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and "access_policy.read" in lines[0] and "refused" in lines[0]

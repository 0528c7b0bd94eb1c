"""Shell completion as docs/cli.md documents it: image and session names, offline."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def _complete(words: str, home: Path, cwd: Path) -> list[str]:
    cword = len(words.split()) - (0 if words.endswith(" ") else 1)
    env = {**os.environ, "TDAPP_HOME": str(home), "_TDAPP_COMPLETE": "bash_complete",
           "COMP_WORDS": words, "COMP_CWORD": str(cword)}
    env.pop("TDAPP_CAS", None)
    # The installed program: completion keys on its name (_TDAPP_COMPLETE).
    done = subprocess.run([str(Path(sys.executable).parent / "tdapp")], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    pairs = [line.partition(",") for line in done.stdout.splitlines()]
    return [value for kind, _, value in pairs if kind == "plain"]


def test_image_and_session_names_complete_from_local_state(tmp_path: Path) -> None:
    repo = Path(__file__).resolve().parent.parent
    home = tmp_path / "home"
    env = {**os.environ, "TDAPP_HOME": str(home)}
    subprocess.run([sys.executable, "-m", "tdapp", "build", str(repo / "examples" / "copy_dapp"),
                    "--name", "copy_demo"], env=env, check=True, capture_output=True,
                   timeout=120)
    sessions = tmp_path / "KEYS" / "sessions"
    sessions.mkdir(parents=True)
    (sessions / "alpha-1.json").write_text("{}")
    (sessions / "beta-2.json").write_text("{}")
    assert _complete("tdapp run co", home, tmp_path) == ["copy_demo"]
    assert "copy_demo" in _complete("tdapp measure ", home, tmp_path)
    assert _complete("tdapp session tags al", home, tmp_path) == ["alpha-1"]
    assert sorted(_complete("tdapp session push ", home, tmp_path)) == ["alpha-1", "beta-2"]


@pytest.mark.parametrize("words", ["tdapp run ", "tdapp session history "])
def test_completion_without_any_state_offers_nothing_and_fails_nothing(
        tmp_path: Path, words: str) -> None:
    # No image store, no KEYS folder, no CAS anywhere: no candidates, no error.
    assert _complete(words, tmp_path / "nohome", tmp_path) == []

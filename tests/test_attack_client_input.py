"""Crafted KEYS folders and files against ``encryptedpush`` and ``decrypt``: one clear line.

No CAS is needed: every refusal here must come before anything is sent, and
must leave what is stored byte-identical.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import CliResult, assert_error, snapshot

from tdapp.volume import Volume, VolumeKey
from tdapp.volume.bundle import pack

Cli = Callable[..., CliResult]
OUTPUT = "encrypted-output-files"


@pytest.fixture(autouse=True)
def _own_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TDAPP_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    for folder in ("KEYS", "INPUTS", "OUTPUTS", "ZIP"):
        (tmp_path / folder).mkdir()


def _bundle(tmp_path: Path, key: VolumeKey) -> None:
    """ZIP/out.zip holding an (empty) output volume sealed with ``key``."""
    (tmp_path / "empty").mkdir(exist_ok=True)
    folder = tmp_path / "made" / secrets.token_hex(4) / OUTPUT
    Volume.create(folder, key, source=tmp_path / "empty")
    pack({OUTPUT: folder}, tmp_path / "ZIP" / "out.zip")


def _state(name: str, key: VolumeKey, **changes: object) -> dict[str, object]:
    document: dict[str, object] = {
        "session": name, "service": "application", "application": "copy_demo",
        "cas": "127.0.0.1:1", "cas_fingerprint": "ab" * 32, "session_hash": "00", "url": "x",
        "volumes": {OUTPUT: {"key": key.hex(), "tag": "00" * 16}}}
    document.update(changes)
    return {key_: value for key_, value in document.items() if value is not None}


def _write_state(path: Path, document: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document))


KEY = VolumeKey.generate()
BROKEN_STATES: dict[str, tuple[bytes, str]] = {
    "not-json": (b'{"session": "tdapp-', "is not JSON"),
    "a-list": (b"[]", "is not a JSON object"),
    "no-session": (json.dumps(_state("s", KEY, session=None)).encode(), "'session' is missing"),
    "volumes-a-list": (json.dumps(_state("s", KEY, volumes=[])).encode(),
                       f"no {OUTPUT} volume"),
    "key-not-hex": (json.dumps(_state("s", KEY, volumes={OUTPUT: {"key": "zz" * 32}})).encode(),
                    "volume key is not hexadecimal"),
    "no-key": (json.dumps(_state("s", KEY, volumes={OUTPUT: {}})).encode(),
               f"{OUTPUT} 'key' is missing"),
    "no-fingerprint": (json.dumps(_state("s", KEY, cas_fingerprint=None)).encode(),
                       "'cas_fingerprint' is missing"),
    "bad-address": (json.dumps(_state("s", KEY, cas="127.0.0.1:99999")).encode(),
                    "out of range"),
    "deeply-nested": (b"[" * 100_000 + b"]" * 100_000, "is not JSON"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_STATES))
def test_decrypt_names_a_broken_state_file_and_writes_nothing(
        cli: Cli, tmp_path: Path, case: str) -> None:
    content, reason = BROKEN_STATES[case]
    (tmp_path / "KEYS" / "tdapp-session.json").write_bytes(content)
    _bundle(tmp_path, KEY)
    before = snapshot(tmp_path / "KEYS")
    result = cli("decrypt")
    assert_error(result, 3, reason)
    assert "tdapp-session.json" in result.err
    assert snapshot(tmp_path / "KEYS") == before
    assert list((tmp_path / "OUTPUTS").iterdir()) == []


@pytest.mark.parametrize("kind", ["directory", "symlink-loop", "dangling-symlink"])
def test_decrypt_names_a_state_file_that_is_no_file(cli: Cli, tmp_path: Path, kind: str) -> None:
    state = tmp_path / "KEYS" / "sessions" / "tdapp-x.json"
    state.parent.mkdir()
    if kind == "directory":
        state.mkdir()
    elif kind == "symlink-loop":
        state.symlink_to(state.name)
    else:
        state.symlink_to(tmp_path / "nowhere")
    _bundle(tmp_path, KEY)
    result = cli("decrypt")
    assert_error(result, 3, "tdapp-x.json")


def test_decrypt_refuses_a_state_file_stored_under_another_sessions_name(
        cli: Cli, tmp_path: Path) -> None:
    _write_state(tmp_path / "KEYS" / "sessions" / "tdapp-a.json", _state("tdapp-b", KEY))
    _bundle(tmp_path, KEY)
    assert_error(cli("decrypt"), 3, "it holds session tdapp-b, not tdapp-a")


def test_a_fifo_in_place_of_the_state_file_does_not_hang_decrypt(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "KEYS" / "tdapp-session.json")
    _bundle(tmp_path, KEY)
    done = subprocess.run([sys.executable, "-m", "tdapp", "decrypt"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60, check=False,
                          env={**os.environ, "TDAPP_HOME": str(tmp_path / "home")})
    assert_error(CliResult(done.returncode, done.stdout, done.stderr), 3,
                 "is not a regular file")


def test_decrypt_refuses_an_ambiguous_bundle_naming_the_sessions(cli: Cli, tmp_path: Path) -> None:
    for name in ("tdapp-one", "tdapp-two"):
        _write_state(tmp_path / "KEYS" / "sessions" / f"{name}.json", _state(name, KEY))
    _bundle(tmp_path, KEY)
    result = cli("decrypt")
    assert_error(result, 3, "tdapp-one, tdapp-two")
    assert "--session" in result.err
    # Naming one gets past the choice, to the CAS check (no CAS is pinned in this home).
    named = cli("decrypt", "--session", "tdapp-two")
    assert_error(named, 7, "the CAS at 127.0.0.1:1 is not pinned")
    assert "ab" * 32 in named.err


def test_decrypt_names_the_sessions_when_the_named_one_is_missing(
        cli: Cli, tmp_path: Path) -> None:
    _write_state(tmp_path / "KEYS" / "sessions" / "tdapp-one.json", _state("tdapp-one", KEY))
    _bundle(tmp_path, KEY)
    assert_error(cli("decrypt", "--session", "tdapp-nine"), 3,
                 "holds no session tdapp-nine (it holds tdapp-one)")
    assert_error(cli("decrypt", "--session", "../KEYS/x"), 2, "is not a session name")


def test_decrypt_of_a_bundle_no_session_opens_is_a_wrong_key(cli: Cli, tmp_path: Path) -> None:
    _write_state(tmp_path / "KEYS" / "sessions" / "tdapp-one.json", _state("tdapp-one", KEY))
    _bundle(tmp_path, VolumeKey.generate())
    assert_error(cli("decrypt"), 5, "wrong key: none of the 1 sessions")
    assert list((tmp_path / "OUTPUTS").iterdir()) == []


def _push(cli: Cli, *extra: str) -> CliResult:
    return cli("encryptedpush", "--application", "copy_demo", "-t", "template.yml",
               "--cas", "127.0.0.1:1", "--push", "http://127.0.0.1:1/upload", *extra)


def test_encryptedpush_never_replaces_a_state_file_it_cannot_read(
        cli: Cli, tmp_path: Path) -> None:
    (tmp_path / "template.yml").write_text("name: $SESSION\n")
    latest = tmp_path / "KEYS" / "tdapp-session.json"
    latest.write_bytes(b'{"session": "tdapp-half-writ')
    result = _push(cli)
    assert_error(result, 3, "tdapp-session.json is not a usable session state file")
    assert "move it aside" in result.err
    assert latest.read_bytes() == b'{"session": "tdapp-half-writ'
    assert list((tmp_path / "KEYS" / "sessions").iterdir()) == []


@pytest.mark.parametrize("kind", ["keys-is-a-file", "sessions-is-a-file", "state-is-a-folder",
                                  "template-not-utf8", "template-is-a-folder",
                                  "inputs-is-a-file"])
def test_encryptedpush_bad_folders_and_files_are_one_line(
        cli: Cli, tmp_path: Path, kind: str) -> None:
    template = tmp_path / "template.yml"
    template.write_text("name: $SESSION\n")
    extra: list[str] = []
    fragment = {"keys-is-a-file": "'KEYS2' is a file",
                "sessions-is-a-file": "sessions is not a folder",
                "state-is-a-folder": "tdapp-session.json is not a regular file",
                "template-not-utf8": "is not UTF-8 text",
                "template-is-a-folder": "template.yml",
                "inputs-is-a-file": "'INPUTS' is a file"}[kind]
    if kind == "keys-is-a-file":
        (tmp_path / "KEYS2").write_text("not a folder")
        extra = ["--conf", "KEYS2"]
    elif kind == "sessions-is-a-file":
        (tmp_path / "KEYS" / "sessions").write_text("not a folder")
    elif kind == "state-is-a-folder":
        (tmp_path / "KEYS" / "tdapp-session.json").mkdir()
    elif kind == "template-not-utf8":
        template.write_bytes(b"name: \xff\xfe\n")
    elif kind == "template-is-a-folder":
        template.unlink()
        template.mkdir()
    else:
        (tmp_path / "INPUTS").rmdir()
        (tmp_path / "INPUTS").write_text("not a folder")
    before = snapshot(tmp_path)
    result = _push(cli, *extra)
    assert result.code in (2, 3), result.err
    lines = result.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("tdapp: error: "), result.err
    assert fragment in lines[0] and "internal error" not in lines[0]
    after = snapshot(tmp_path)
    after.pop("KEYS/sessions", None)  # the empty folder a push prepares is all it may add
    before.pop("KEYS/sessions", None)
    assert after == before

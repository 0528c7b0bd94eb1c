"""One session, many runs: ``tdapp session push`` gives a session new inputs.

Through ``tdapp`` as a user would: push, run, decrypt; push new inputs into the
same session, run the same DApp again, decrypt the new output; the tags the
CAS holds move forward each time and the history says who moved them. Then
the attacks: the host replays the bundle of the older inputs (refused, nothing
uploaded), another identity or an anonymous caller tries to move the tags, a
stale owner tries to move them back, and the owner tries to replace a volume
it imports. None of them moves a tag.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from cas_fixtures import (
    CasServer,
    MakeUser,
    SessionDoc,
    StartCas,
    User,
    anonymous_http,
    unique_name,
)
from walk_fixtures import Walk, running_up, transfer_objects

REPO = Path(__file__).resolve().parent.parent
INPUT, OUTPUT = "encrypted-input-files", "encrypted-output-files"
needs_bwrap = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is missing")


@pytest.fixture(scope="module")
def walk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Walk]:
    with running_up(tmp_path_factory.mktemp("push")) as started:
        started.tdapp("build", str(REPO / "examples" / "copy_dapp"), "--name", "copy_demo",
                      "-o", str(started.example / "KEYS" / "copy_dapp.yml"))
        yield started


def _inputs(walk: Walk, text: str) -> None:
    inputs = walk.example / "INPUTS"
    shutil.rmtree(inputs, ignore_errors=True)
    inputs.mkdir()
    (inputs / "f.txt").write_text(text)


def _tags(walk: Walk, name: str) -> dict[str, str]:
    return dict(json.loads(walk.tdapp("session", "tags", name, "--json").stdout))


def _run_and_decrypt(walk: Walk, arguments: list[str], out: str) -> str:
    url = walk.tdapp("run", "copy_demo", *arguments, "--push", walk.push).stdout.strip()
    walk.tdapp("decrypt", "--encrypted", url, "--out", out)
    return (walk.example / out / "f.txt").read_text()


@needs_bwrap
def test_new_inputs_go_into_the_same_session_and_the_old_ones_no_longer_run(
        walk: Walk) -> None:
    name = unique_name("many")
    _inputs(walk, "first\n")
    first = walk.tdapp("encryptedpush", "-a", "copy_demo", "-t", "KEYS/copy_dapp.yml",
                       "--session", name).stdout.split()
    assert _run_and_decrypt(walk, first, "OUT1") == "first\n"
    state_file = walk.example / "KEYS" / "sessions" / f"{name}.json"
    keys_before = {v: d["key"] for v, d in json.loads(state_file.read_text())["volumes"].items()}
    after_first = _tags(walk, name)

    _inputs(walk, "second\n")
    pushed = json.loads(walk.tdapp("session", "push", name, "--json").stdout)
    assert pushed["session"] == name and f"{name}/application" in pushed["arguments"]
    second_tags = _tags(walk, name)
    assert second_tags[INPUT] != after_first[INPUT]
    assert second_tags[OUTPUT] != after_first[OUTPUT]
    assert _run_and_decrypt(walk, pushed["arguments"], "OUT2") == "second\n"
    # The output moved forward again, by the run; the keys were never replaced.
    assert _tags(walk, name)[OUTPUT] != second_tags[OUTPUT]
    state = json.loads(state_file.read_text())
    assert {v: d["key"] for v, d in state["volumes"].items()} == keys_before
    assert state["url"] == pushed["url"]
    history = [json.loads(line) for line in
               walk.tdapp("session", "history", name, "--json").stdout.splitlines()]
    replaced = [e for e in history if e["event"] == "volume.replace"]
    assert len(replaced) == 2 and all(e["outcome"] == "accepted" and e["actor"]
                                      for e in replaced)

    # The host replays the first bundle (the older inputs): refused before the program
    # runs, and nothing is uploaded.
    before = transfer_objects(walk)
    replay = walk.tdapp("run", "copy_demo", *first, "--push", walk.push, check=False)
    assert replay.returncode != 0 and replay.stdout == ""
    assert "tag" in replay.stderr, replay.stderr
    assert transfer_objects(walk) == before


@needs_bwrap
def test_a_push_into_a_session_this_folder_does_not_hold_changes_nothing(walk: Walk) -> None:
    missing = walk.tdapp("session", "push", "no-such-session", check=False)
    assert missing.returncode != 0 and "holds no session no-such-session" in missing.stderr
    # encryptedpush with a name already kept points at session push.
    name = unique_name("again")
    _inputs(walk, "x\n")
    walk.tdapp("encryptedpush", "-a", "copy_demo", "-t", "KEYS/copy_dapp.yml",
               "--session", name)
    again = walk.tdapp("encryptedpush", "-a", "copy_demo", "-t", "KEYS/copy_dapp.yml",
                       "--session", name, check=False)
    assert again.returncode != 0 and f"tdapp session push {name}" in again.stderr


# -- attacks on the CAS's replace: identities, anonymous callers, stale owners -----------


@pytest.fixture(scope="module")
def owners(cas_server: StartCas, user: MakeUser) -> tuple[CasServer, User, User]:
    server = cas_server()
    alice, mallory = user("alice-push"), user("mallory-push")
    alice.attest(server)
    mallory.attest(server)
    return server, alice, mallory


def _create(server: CasServer, who: User, doc: SessionDoc) -> None:
    path = who.home / f"{doc.name}.yml"
    path.write_text(doc.text())
    done = who.tdapp("session", "create", str(path), "--cas", server.address)
    assert done.code == 0, done.err


def _replace(http: object, name: str, moves: list[dict[str, str | None]]) -> int:
    import httpx

    assert isinstance(http, httpx.Client)
    with http:
        return http.post("/v1/volume-tags/replace",
                         json={"session": name, "moves": moves}).status_code


def _current(server: CasServer, who: User, name: str) -> dict[str, str]:
    done = who.tdapp("session", "tags", name, "--json", "--cas", server.address)
    assert done.code == 0, done.err
    return dict(json.loads(done.out))


def test_only_the_owner_replaces_volumes_and_only_from_the_current_tags(
        owners: tuple[CasServer, User, User]) -> None:
    server, alice, mallory = owners
    doc = SessionDoc(unique_name("owned"))
    _create(server, alice, doc)
    start = _current(server, alice, doc.name)
    move = [{"volume": INPUT, "old": start[INPUT], "new": "ab" * 16}]
    # Another identity, then nobody at all: neither moves a tag.
    assert _replace(mallory.http(server), doc.name, move) == 403
    assert _replace(anonymous_http(server), doc.name, move) in (401, 403)
    assert _current(server, alice, doc.name) == start
    # A stale owner (an old tag) moves nothing, not even the volume that is current.
    stale = [{"volume": OUTPUT, "old": start[OUTPUT], "new": "cd" * 16},
             {"volume": INPUT, "old": "00" * 16, "new": "ef" * 16}]
    assert _replace(alice.http(server), doc.name, stale) == 409
    assert _current(server, alice, doc.name) == start
    # The owner, from the current tags: both move at once.
    both = [{"volume": INPUT, "old": start[INPUT], "new": "ab" * 16},
            {"volume": OUTPUT, "old": start[OUTPUT], "new": "cd" * 16}]
    assert _replace(alice.http(server), doc.name, both) == 200
    assert _current(server, alice, doc.name) == {INPUT: "ab" * 16, OUTPUT: "cd" * 16}
    # Replaying the same request (now stale) cannot move them back or again.
    assert _replace(alice.http(server), doc.name, both) == 409
    back = [{"volume": INPUT, "old": "ab" * 16, "new": start[INPUT]}]
    assert _replace(mallory.http(server), doc.name, back) == 403
    assert _current(server, alice, doc.name) == {INPUT: "ab" * 16, OUTPUT: "cd" * 16}
    history = alice.tdapp("session", "history", doc.name, "--json", "--cas", server.address)
    refused = [json.loads(line) for line in history.out.splitlines()
               if '"volume.replace"' in line and '"refused"' in line]
    assert any(mallory.identity in (event["actor"] or "") for event in refused)


def test_a_volume_the_session_does_not_declare_is_not_replaced(
        owners: tuple[CasServer, User, User]) -> None:
    server, alice, _ = owners
    doc = SessionDoc(unique_name("undeclared"))
    _create(server, alice, doc)
    start = _current(server, alice, doc.name)
    for moves in ([{"volume": "elsewhere", "old": None, "new": "ab" * 16}],
                  [{"volume": INPUT, "old": start[INPUT], "new": "not-hex"}],
                  [{"volume": INPUT, "old": start[INPUT], "new": "ab" * 16}] * 2, []):
        assert _replace(alice.http(server), doc.name, moves) in (400, 404)
    assert _current(server, alice, doc.name) == start


@needs_bwrap
def test_the_readme_example_of_a_second_run_works_as_written(walk: Walk) -> None:
    import re
    import subprocess
    import sys

    readme = (REPO / "README.md").read_text()
    section = readme.split("To run the DApp again on new inputs", 1)[1]
    block = re.search(r"```\n(.*?)```", section, re.DOTALL)
    assert block is not None
    script = block.group(1).replace(" daily", f" {unique_name('daily')}")
    inputs = walk.example / "INPUTS"
    shutil.rmtree(inputs, ignore_errors=True)
    inputs.mkdir()
    (inputs / "f1.txt").write_text("Hello world\n")
    shutil.rmtree(walk.example / "OUTPUTS", ignore_errors=True)
    env = {**walk.env, "PATH": f"{Path(sys.executable).parent}:{walk.env['PATH']}"}
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=walk.example, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert (walk.example / "OUTPUTS" / "f1.txt").read_text() == "Hello again\n"

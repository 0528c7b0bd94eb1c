"""Sessions over time, through ``tdapp`` as two users would: list, tags, history.

``tdapp session list`` shows an identity its own sessions and no one else's;
``tdapp session tags`` the tags the CAS holds now (they move with runs);
``tdapp session history`` every decision about a session, attestations refused
with their reason included, to its readers only.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cas_fixtures import CasServer, MakeUser, SessionDoc, StartCas, User, free_port, unique_name
from test_cas_attestation import (  # noqa: F401 - las is a fixture
    attempt,
    bind,
    evidence,
    las,
    new_nonce,
    platform_of,
)
from walk_fixtures import Walk, running_up

from tdapp.client.key_release import EphemeralKey

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def two(cas_server: StartCas, user: MakeUser, las: str) -> tuple[CasServer, User, User]:  # noqa: F811
    server = cas_server(extra=("--debug", "--las-platform", platform_of(las)))
    alice, bob = user("alice-daily"), user("bob-daily")
    alice.attest(server)
    bob.attest(server)
    return server, alice, bob


def _create(server: CasServer, who: User, doc: SessionDoc) -> str:
    path = who.home / f"{doc.name.replace('/', '_')}.yml"
    path.write_text(doc.text())
    done = who.tdapp("session", "create", str(path), "--cas", server.address)
    assert done.code == 0, done.err
    return done.out.strip()


def test_list_shows_an_identity_its_own_sessions_only(two: tuple[CasServer, User, User]) -> None:
    server, alice, bob = two
    mine = [unique_name("alice"), unique_name("alice")]
    theirs = unique_name("bob")
    for name in mine:
        _create(server, alice, SessionDoc(name))
    _create(server, bob, SessionDoc(theirs))
    listed = alice.tdapp("session", "list", "--json", "--cas", server.address)
    assert listed.code == 0, listed.err
    names = {json.loads(line)["name"] for line in listed.out.splitlines()}
    assert set(mine) <= names and theirs not in names
    table = alice.tdapp("session", "list", "--cas", server.address)
    assert mine[0] in table.out and theirs not in table.out
    entry = next(json.loads(line) for line in listed.out.splitlines()
                 if json.loads(line)["name"] == mine[0])
    assert entry["mode"] == "sim" and entry["revision"] == 1


def test_tags_and_history_follow_runs_and_refusals(
        two: tuple[CasServer, User, User], las: str) -> None:  # noqa: F811
    server, alice, bob = two
    doc = SessionDoc(unique_name("daily"))
    _create(server, alice, doc)
    tags = json.loads(alice.tdapp("session", "tags", doc.name, "--json", "--cas",
                                  server.address).out)
    assert tags == doc.tags
    # A refused attestation (another measurement) and an accepted one that moves a tag.
    nonce = new_nonce(server, doc.name)
    key = EphemeralKey()
    refused = attempt(server, doc.name, evidence(las, bind(nonce, key, doc.name), "cd" * 32),
                      nonce, key)
    assert refused.status_code == 403
    nonce = new_nonce(server, doc.name)
    key = EphemeralKey()
    answer = attempt(server, doc.name, evidence(las, bind(nonce, key, doc.name)), nonce, key)
    config = key.open(answer.json()["jwe"])
    from test_cas_attestation import runtime

    from tdapp.client.key_release import commit_run

    commit_run(runtime(server), config.token.get_secret_value(), doc.name,
               {"encrypted-output-files": (doc.tags["encrypted-output-files"], "ee" * 16)}, None)
    now = json.loads(alice.tdapp("session", "tags", doc.name, "--json", "--cas",
                                 server.address).out)
    assert now["encrypted-output-files"] == "ee" * 16
    events = [json.loads(line) for line in alice.tdapp(
        "session", "history", doc.name, "--json", "--cas", server.address).out.splitlines()]
    kinds = [(event["event"], event["outcome"]) for event in events]
    assert ("session.create", "accepted") in kinds and ("attest", "refused") in kinds
    assert ("attest", "accepted") in kinds and ("run.commit", "accepted") in kinds
    assert any("measurement" in event["reason"] for event in events
               if event["outcome"] == "refused")
    table = alice.tdapp("session", "history", doc.name, "--cas", server.address)
    assert table.code == 0 and "run.commit" in table.out
    # Not to another identity: neither the history nor the tags.
    for command in ("history", "tags"):
        other = bob.tdapp("session", command, doc.name, "--cas", server.address)
        assert other.code == 7 and other.out == "" and "may not read" in other.err


@pytest.fixture(scope="module")
def walk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Walk]:
    with running_up(tmp_path_factory.mktemp("daily")) as started:
        started.tdapp("build", str(REPO / "examples" / "copy_dapp"), "--name", "copy_demo",
                      "-o", str(started.example / "KEYS" / "copy_dapp.yml"))
        (started.example / "INPUTS" / "f.txt").write_text("named\n")
        yield started


@pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is missing")
def test_encryptedpush_names_the_session_as_asked_and_keeps_keys_under_that_name(
        walk: Walk) -> None:
    name = unique_name("named")
    line = walk.tdapp("encryptedpush", "-a", "copy_demo", "-t", "KEYS/copy_dapp.yml",
                      "--session", name).stdout
    assert f"--sessionID {name}/application" in line
    assert (walk.example / "KEYS" / "sessions" / f"{name}.json").is_file()
    # The same name again: refused before anything is made; the kept keys are untouched.
    kept = (walk.example / "KEYS" / "sessions" / f"{name}.json").read_bytes()
    again = walk.tdapp("encryptedpush", "-a", "copy_demo", "-t", "KEYS/copy_dapp.yml",
                       "--session", name, check=False)
    assert again.returncode != 0 and "already exists" in again.stderr, again.stderr
    assert (walk.example / "KEYS" / "sessions" / f"{name}.json").read_bytes() == kept
    # A template that writes its own name keeps it, and -e fills its variables.
    template = (walk.example / "KEYS" / "copy_dapp.yml").read_text()
    literal = unique_name("literal")
    own = walk.example / "KEYS" / "own.yml"
    own.write_text(template.replace("$SESSION", f"{literal}-$SUFFIX", 1))
    line = walk.tdapp("encryptedpush", "-a", "copy_demo", "-t", "KEYS/own.yml",
                      "-e", "SUFFIX=x").stdout
    assert f"--sessionID {literal}-x/application" in line
    command = line.split()
    url = walk.tdapp("run", "copy_demo", *command, "--push", walk.push).stdout.strip()
    walk.tdapp("decrypt", "--encrypted", url, "--out", str(walk.example / "OWN"))
    assert (walk.example / "OWN" / "f.txt").read_text() == "named\n"
    # A missing variable names the -e that fills it, which encryptedpush takes.
    missing = walk.tdapp("encryptedpush", "-a", "copy_demo", "-t", "KEYS/own.yml",
                         check=False)
    assert missing.returncode == 2 and "-e SUFFIX=VALUE" in missing.stderr


@pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is missing")
def test_the_commands_a_script_uses_speak_json(walk: Walk) -> None:
    built = json.loads(walk.tdapp("build", str(REPO / "examples" / "copy_dapp"), "--name",
                                  "copy_json", "--json").stdout)
    assert built["name"] == "copy_json" and len(built["measurement"]) == 64
    me = json.loads(walk.tdapp("self", "show", "--json").stdout)
    assert len(me["identity"]) == 64 and isinstance(me["cas_certificates"], list)
    pushed = json.loads(walk.tdapp("encryptedpush", "-a", "copy_demo", "-t",
                                   "KEYS/copy_dapp.yml", "--json").stdout)
    assert pushed["url"].startswith("http") and "--sessionID" in pushed["arguments"]
    running = walk.tdapp("run", "copy_demo", *pushed["arguments"], "--push", walk.push,
                         "--json")
    assert "program: ended after " in running.stderr and "(exit 0)" in running.stderr
    ran = json.loads(running.stdout)
    assert ran["url"].startswith("http") and Path(walk.example / ran["receipt"]).is_file()
    done = walk.tdapp("decrypt", "--encrypted", ran["url"], "--out",
                      str(walk.example / "JSON"), "--json")
    decrypted = json.loads(done.stdout)
    assert decrypted["files"] == 1 and decrypted["session"] == pushed["session"]
    assert decrypted["receipt"]["session"] == pushed["session"]
    volume = walk.example / "vol"
    created = walk.tdapp("volume", "create", str(volume), "--from",
                         str(walk.example / "INPUTS"), "--envar-output").stdout
    env = dict(line.removeprefix("export ").split("=", 1) for line in created.split("\n")
               if "=" in line)
    verified = subprocess.run(
        [sys.executable, "-m", "tdapp", "volume", "verify", str(volume), "--json"],
        env={**walk.env, **{k: v.strip("'\"") for k, v in env.items()}}, capture_output=True,
        text=True, check=False, timeout=60)
    assert verified.returncode == 0, verified.stderr
    assert json.loads(verified.stdout)["files"] == 1


def test_a_user_who_pinned_one_cas_reaches_it_without_naming_it(
        two: tuple[CasServer, User, User]) -> None:
    """A second user has no up.json (another user runs tdapp up), on a non-default port: the
    one CAS it pinned is the one its commands talk to."""
    server, _, bob = two
    assert not server.address.endswith(":8081")
    listed = bob.tdapp("session", "list", "--json")
    assert listed.code == 0, listed.err
    assert all(json.loads(line)["name"].startswith("bob") for line in listed.out.splitlines())


def test_cas_audit_finds_the_database_of_up_state_dir_and_names_a_missing_one(
        tmp_path: Path) -> None:
    state = tmp_path / "state"
    (tmp_path / "up-root").mkdir()
    with running_up(tmp_path / "up-root", "--state-dir", str(state)) as walk:
        walk.tdapp("build", str(REPO / "examples" / "copy_dapp"), "--name", "copy_demo",
                   "-o", str(walk.example / "KEYS" / "copy_dapp.yml"))
        (walk.example / "INPUTS" / "f.txt").write_text("audited\n")
        session = json.loads(walk.tdapp("encryptedpush", "-a", "copy_demo", "-t",
                                        "KEYS/copy_dapp.yml", "--json").stdout)["session"]
        events = walk.tdapp("cas", "audit", "--session", session, "--json").stdout
        assert any(json.loads(line)["event"] == "session.create"
                   for line in events.splitlines())
        nowhere = tmp_path / "nowhere"
        missing = walk.tdapp("cas", "audit", "--state-dir", str(nowhere), check=False)
        assert missing.returncode == 3 and str(nowhere / "cas.db") in missing.stderr
        assert not (nowhere / "cas.db").exists()  # nothing made where nothing was


def test_a_run_with_a_push_nobody_answers_fails_before_anything_runs(walk: Walk) -> None:
    pushed = json.loads(walk.tdapp("encryptedpush", "-a", "copy_demo", "-t",
                                   "KEYS/copy_dapp.yml", "--json").stdout)
    port = free_port()  # nothing listens there
    done = walk.tdapp("run", "copy_demo", *pushed["arguments"], "--push",
                      f"http://127.0.0.1:{port}/upload", check=False)
    assert done.returncode != 0 and done.stdout == ""
    assert f"nothing answers at http://127.0.0.1:{port}/upload (from --push)" in done.stderr
    events = walk.tdapp("cas", "audit", "--session", pushed["session"], "--json").stdout
    assert not any(json.loads(line)["event"].startswith("attest")
                   for line in events.splitlines())  # not even attested


def test_delete_needs_the_update_right_and_leaves_no_key_tag_or_instance_behind(
        two: tuple[CasServer, User, User], las: str) -> None:  # noqa: F811
    server, alice, bob = two
    doc = SessionDoc(unique_name("doomed"))
    _create(server, alice, doc)
    nonce = new_nonce(server, doc.name)
    key = EphemeralKey()
    answer = attempt(server, doc.name, evidence(las, bind(nonce, key, doc.name)), nonce, key)
    token = key.open(answer.json()["jwe"]).token.get_secret_value()
    # Another identity may not; asking without --yes in a script is refused.
    assert bob.tdapp("session", "delete", doc.name, "--yes", "--cas", server.address).code == 7
    unconfirmed = alice.tdapp("session", "delete", doc.name, "--cas", server.address)
    assert unconfirmed.code == 2 and "--yes" in unconfirmed.err
    deleted = alice.tdapp("session", "delete", doc.name, "--yes", "--cas", server.address)
    assert deleted.code == 0, deleted.err
    gone = alice.tdapp("session", "read", doc.name, "--cas", server.address)
    assert gone.code != 0 and "no session named" in gone.err
    # Made again under the same name: the old session's instance moves none of its tags.
    _create(server, alice, doc)
    from test_cas_attestation import runtime

    from tdapp.client.key_release import report_tag
    from tdapp.errors import TdappError

    with pytest.raises(TdappError):
        report_tag(runtime(server), token, doc.name, "encrypted-output-files",
                   doc.tags["encrypted-output-files"], "ab" * 16)
    tags = json.loads(alice.tdapp("session", "tags", doc.name, "--json", "--cas",
                                  server.address).out)
    assert tags == doc.tags
    history = alice.tdapp("session", "history", doc.name, "--json", "--cas", server.address)
    assert any(json.loads(line)["event"] == "session.delete" for line in history.out.splitlines())


def test_a_namespace_in_use_is_not_deleted(two: tuple[CasServer, User, User]) -> None:
    server, alice, _ = two
    namespace = unique_name("ns")
    path = alice.home / f"{namespace}.yml"
    path.write_text(f"name: {namespace}\nversion: '0.3'\naccess_policy:\n  read: [CREATOR]\n"
                    "  update: [CREATOR]\n  create_sessions: [CREATOR]\n")
    assert alice.tdapp("session", "create", str(path), "--cas", server.address).code == 0
    _create(server, alice, SessionDoc(f"{namespace}/child"))
    refused = alice.tdapp("session", "delete", namespace, "--yes", "--cas", server.address)
    assert refused.code != 0 and "delete them first" in refused.err
    assert alice.tdapp("session", "read", namespace, "--cas", server.address).code == 0

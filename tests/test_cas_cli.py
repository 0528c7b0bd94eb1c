"""``tdapp session …`` against a live CAS, run as the real program by simulated users.

Results go to stdout (a hash, a session), every failure is one ``tdapp: error:``
line on stderr with the exit code of its kind, and nothing is half-done.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from cas_fixtures import (
    HEX64,
    CasServer,
    MakeUser,
    SessionDoc,
    StartCas,
    User,
    fspf_variables,
    unique_name,
)
from conftest import CliResult, assert_error
from seed_data import SEED_TEMPLATE

from tdapp.errors import ExitCode
from tdapp.policy import parse_session, session_hash


@dataclass
class Setup:
    server: CasServer
    alice: User
    bob: User

    def run(self, someone: User, *args: str | Path) -> CliResult:
        return someone.tdapp(*args, "--cas", self.server.address)


@pytest.fixture(scope="module")
def setup(cas_server: StartCas, user: MakeUser) -> Setup:
    server = cas_server()
    alice, bob = user("alice"), user("bob")
    alice.attest(server)
    bob.attest(server)
    return Setup(server, alice, bob)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("templates") / "copy_dapp.yml"
    path.write_text(SEED_TEMPLATE)
    return path


def assignments(name: str) -> list[str]:
    return [arg for var, value in {"SESSION": name, **fspf_variables()}.items()
            for arg in ("-e", f"{var}={value}")]


def one_hash(result: CliResult) -> str:
    assert result.code == 0, result.err
    lines = result.out.splitlines()
    assert len(lines) == 1 and HEX64.match(lines[0]), result.out
    return lines[0]


def test_create_prints_the_hash_that_session_hash_computes_locally(
        setup: Setup, template: Path) -> None:
    name = unique_name("cli")
    values = assignments(name)
    created = one_hash(setup.run(setup.alice, "session", "create", template, *values))
    # The seed's template names no mode: `hash` asks the CAS which one it would fix.
    local = one_hash(setup.run(setup.alice, "session", "hash", template, *values))
    assert local == created
    # The hash covers the creator: the same document is another session for Bob.
    assert one_hash(setup.run(setup.bob, "session", "hash", template, *values)) != created
    # A document that states its mode is hashed without asking any CAS.
    stated = template.with_name("stated.yml")
    stated.write_text(template.read_text() + "\nsecurity:\n  attestation:\n    mode: hardware\n")
    assert one_hash(setup.alice.tdapp("session", "hash", stated, *values)) == local
    # And the name form asks the CAS.
    assert one_hash(setup.run(setup.alice, "session", "hash", name)) == created


def test_read_prints_yaml_of_the_same_session(setup: Setup, template: Path) -> None:
    name = unique_name("cli-read")
    created = one_hash(setup.run(setup.alice, "session", "create", template,
                                 *assignments(name)))
    result = setup.run(setup.alice, "session", "read", name)
    assert result.code == 0, result.err
    assert yaml.safe_load(result.out)["name"] == name
    # What read prints is the next update's draft: the session, and the current hash as its
    # one predecessor.
    draft = parse_session(result.out, source="read")
    assert result.out.count("predecessor:") == 1 and draft.predecessor == created
    as_created = draft.model_copy(update={"predecessor": None})
    assert session_hash(as_created, setup.alice.identity) == created


def test_update_with_the_right_predecessor_prints_a_new_hash(
        setup: Setup, tmp_path: Path) -> None:
    doc = SessionDoc(unique_name("cli-update"), command="/rev1")
    (tmp_path / "v1.yml").write_text(doc.text())
    h1 = one_hash(setup.run(setup.alice, "session", "create", tmp_path / "v1.yml"))

    # The update is a template too: the predecessor comes from -e.
    doc.command, doc.predecessor = "/rev2", "PLACEHOLDER"
    (tmp_path / "v2.yml").write_text(doc.text().replace("PLACEHOLDER", "$PREDECESSOR"))
    h2 = one_hash(setup.run(setup.alice, "session", "update", tmp_path / "v2.yml",
                            "-e", f"PREDECESSOR={h1}"))
    assert h2 != h1
    assert one_hash(setup.run(setup.alice, "session", "hash", doc.name)) == h2

    # The same update again names a stale predecessor: refused, nothing changes.
    result = setup.run(setup.alice, "session", "update", tmp_path / "v2.yml",
                       "-e", f"PREDECESSOR={h1}")
    assert_error(result, ExitCode.CONFLICT, "stale predecessor")
    assert h2 in result.err
    read = setup.run(setup.alice, "session", "read", doc.name)
    assert "/rev2" in read.out
    assert one_hash(setup.run(setup.alice, "session", "hash", doc.name)) == h2


def test_an_unfilled_template_variable_is_one_line_and_exit_2(
        setup: Setup, template: Path) -> None:
    name = unique_name("cli-unfilled")
    values = {"SESSION": name, **fspf_variables()}
    del values["OUTPUT_FSPF_KEY"]
    args = [arg for var, value in values.items() for arg in ("-e", f"{var}={value}")]
    for command in ("create", "hash"):
        result = setup.run(setup.alice, "session", command, template, *args)
        assert_error(result, ExitCode.USAGE,
                     "tdapp: error: template variable $OUTPUT_FSPF_KEY is not set")
        assert result.out == ""
    # Nothing reached the CAS.
    assert_error(setup.run(setup.alice, "session", "read", name), ExitCode.INPUT,
                 "no session named")


def _files(tmp_path: Path) -> dict[str, Path]:
    valid = SessionDoc("cli-error-doc").text()
    texts = {"unknown-key": valid + "surprise: 1\n", "malformed": "name: [\n",
             "bad-key": valid.replace("fspf_key: ", "fspf_key: zz", 1)}
    files = {name: tmp_path / f"{name}.yml" for name in texts}
    for name, text in texts.items():
        files[name].write_text(text)
    (tmp_path / "latin1.yml").write_bytes(b"name: caf\xe9\n")
    files["latin1"] = tmp_path / "latin1.yml"
    return files


def test_every_error_is_one_line_with_the_exit_code_of_its_kind(
        setup: Setup, tmp_path: Path) -> None:
    alice, bob = setup.alice, setup.bob
    files = _files(tmp_path)
    private = SessionDoc(unique_name("cli-private"))
    (tmp_path / "private.yml").write_text(private.text())
    one_hash(setup.run(alice, "session", "create", tmp_path / "private.yml"))
    surprise_line = files["unknown-key"].read_text().splitlines().index("surprise: 1") + 1
    # A pinned CAS that is not running (nothing listens on port 1).
    dead = "127.0.0.1:1"
    (alice.home / "pins" / "127.0.0.1_1.crt").write_bytes(setup.server.cert_path.read_bytes())

    cases: list[tuple[User, list[str | Path], int, str]] = [
        (alice, ["session", "create", files["unknown-key"]], ExitCode.INPUT,
         f"{files['unknown-key']}:{surprise_line}: unknown key 'surprise'"),
        (alice, ["session", "create", files["malformed"]], ExitCode.INPUT, "malformed YAML"),
        (alice, ["session", "create", files["bad-key"]], ExitCode.INPUT, "fspf_key"),
        (alice, ["session", "hash", files["bad-key"]], ExitCode.INPUT, "fspf_key"),
        (alice, ["session", "create", files["latin1"]], ExitCode.INPUT,
         "cannot read session file"),
        (alice, ["session", "create", tmp_path / "private.yml"], ExitCode.CONFLICT,
         "already exists"),
        (alice, ["session", "read", "nobody-here"], ExitCode.INPUT, "no session named"),
        (bob, ["session", "read", private.name], ExitCode.REFUSED, "access_policy.read"),
        (alice, ["session", "create", files["malformed"], "-e", "NOEQUALS"], ExitCode.USAGE,
         "VAR=VALUE"),
    ]
    for someone, args, code, fragment in cases:
        assert_error(setup.run(someone, *args), code, fragment)

    # Addresses: a malformed one, and a pinned CAS that is not running.
    assert_error(alice.tdapp("session", "read", "x", "--cas", "127.0.0.1:notaport"),
                 ExitCode.USAGE, "is not a number")
    assert_error(alice.tdapp("session", "read", "x", "--cas", dead),
                 ExitCode.UNAVAILABLE, f"cannot reach the CAS at {dead}")
    # A file that does not exist, and a command without its argument (click's own errors).
    assert_error(alice.tdapp("session", "create", tmp_path / "missing.yml"),
                 ExitCode.USAGE, "does not exist")
    assert_error(alice.tdapp("session", "update"), ExitCode.USAGE, "Missing argument")


def test_read_of_a_session_whose_name_ends_in_audit(setup: Setup, tmp_path: Path) -> None:
    """``ns/audit`` is a valid name; reading it must show that session, not crash."""
    namespace = SessionDoc(unique_name("cli-ns"))
    nested = SessionDoc(f"{namespace.name}/audit", command="/nested")
    for doc in (namespace, nested):
        (tmp_path / "s.yml").write_text(doc.text())
        one_hash(setup.run(setup.alice, "session", "create", tmp_path / "s.yml"))
    result = setup.run(setup.alice, "session", "read", nested.name)
    assert result.code == 0, result.err
    assert "Traceback" not in result.err
    assert yaml.safe_load(result.out)["name"] == nested.name

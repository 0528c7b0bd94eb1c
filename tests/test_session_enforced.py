"""Accepted means enforced: a session key the CAS would ignore is refused, with its line.

The attacker here is a wrong belief: an owner writes ``update_policy:
ephemeral``, ``mode: maa`` or a ``secrets`` section, and the CAS stores the
session as if that held. Each key of :data:`tdapp.policy.enforced.RULES` is
tried on its own, locally (``parse_enforceable_session``, ``tdapp session
check``) and against a real CAS, which must answer 400 naming the key and the
line, and store nothing. The published corpora are refused only for keys of
that table, and the walkthrough's documents pass.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from cas_fixtures import MRENCLAVE, CasServer, MakeUser, SessionDoc, StartCas, User, unique_name
from conftest import CliResult
from seed_data import SEED_TEMPLATE
from test_cas_attestation import (  # noqa: F401 - las and world are fixtures
    OTHER,
    attempt,
    bind,
    evidence,
    las,
    new_nonce,
    refused,
    world,
)

from tdapp.client.key_release import EphemeralKey
from tdapp.policy import SessionError, fill_template, parse_session
from tdapp.policy.enforced import parse_enforceable_session, unenforced

Edit = Callable[[dict[str, Any]], None]
PLACEHOLDER = "$$SCONE::api_token$$"
OTP = "JBSWY3DPEHPK3PXP" * 2  # base32, 160 bits


def _set(*path: str | int, value: object) -> Edit:
    def edit(document: dict[str, Any]) -> None:
        where: Any = document
        for key in path[:-1]:
            where = where.setdefault(key, {}) if isinstance(key, str) else where[key]
        where[path[-1]] = value
    return edit


def _with_secret(edit: Edit) -> Edit:
    def both(document: dict[str, Any]) -> None:
        edit(document)
        document["secrets"] = [{"name": "api_token", "kind": "ascii", "size": 16}]
    return both


def _unkeyed_volume(document: dict[str, Any]) -> None:
    del document["volumes"][1]["fspf_key"], document["volumes"][1]["fspf_tag"]


# (the key path the refusal names, the edit that adds it, a word of its reason)
UNENFORCED: list[tuple[str, Edit, str]] = [
    ("security.attestation.mode",
     _set("security", "attestation", value={"mode": "maa", "url": "https://maa.example",
                                             "tolerate": ["maa-managed-tcb"]}), "maa"),
    ("security.attestation.trusted_scone_qe_pubkeys",
     _set("security", "attestation", "trusted_scone_qe_pubkeys", value=["ab" * 32]), "quoting"),
    ("security.attestation.one_time_password_shared_secret",
     _set("security", "attestation", "one_time_password_shared_secret",
          value=OTP), "one-time"),
    ("security.service_access_token", _set("security", "service_access_token", value="t0k3n"),
     "access token"),
    ("security.singleton_enclaves", _set("security", "singleton_enclaves", value=True),
     "singleton"),
    ("services[0].fspf_path", lambda d: d["services"][0].update(
        fspf_path="/fspf.pb", fspf_key="aa" * 32, fspf_tag="bb" * 16), "main FSPF"),
    ("services[0].one_time_password_shared_secret",
     _set("services", 0, "one_time_password_shared_secret", value=OTP),
     "one-time"),
    ("services[0].environment.\\@\\@HOST_VALUE",
     _set("services", 0, "environment", "\\@\\@HOST_VALUE", value=""), "host"),
    ("services[0].environment.TOKEN", _set("services", 0, "environment", "TOKEN",
                                           value=f"Bearer {PLACEHOLDER}"),
     "no secret named 'api_token'"),
    ("services[0].command", _set("services", 0, "command", value="/application @@1"), "@@N"),
    ("services[0].command", _with_secret(_set("services", 0, "command",
                                              value=f"/application {PLACEHOLDER}")),
     "command line is public"),
    ("services[0].pwd", _set("services", 0, "pwd", value=f"/{PLACEHOLDER}"), "no secret named"),
    ("services[0].environment.TOKEN",
     _with_secret(_set("services", 0, "environment", "TOKEN", value="$$SCONE::api_token:crt$$")),
     "kind ascii have no format 'crt'"),
    ("volumes[1].update_policy", _set("volumes", 1, "update_policy", value="ephemeral"),
     "rollback protected"),
    ("volumes[1].update_policy",
     _set("volumes", 1, "update_policy", value="no_rollback_protection"), "rollback protected"),
    ("volumes[1].name", _unkeyed_volume, "first use"),
    ("images[0].volumes[1].update_policy",
     _set("images", 0, "volumes", 1, "update_policy", value="ephemeral"), "rollback"),
    ("images[0].injection_files[0].path",
     _set("images", 0, "injection_files", value=["/etc/app.conf"]), "read from the image"),
    ("images[0].injection_files[0].content",
     _set("images", 0, "injection_files", value=[{"path": "/etc/app.conf",
                                                  "content": f"token={PLACEHOLDER}"}]),
     "no secret named"),
    ("secrets[0].kind", _set("secrets", value=[{"name": "signing", "kind": "pgp-key"}]),
     "OpenPGP"),
    ("secrets[0].import_akv", _set("secrets", value=[{"name": "vaulted", "import_akv": {
        "vault": "https://example.vault.azure.net"}}]), "Azure Key Vault"),
    ("secrets[1].issuer", _set("secrets", value=[
        {"name": "ca", "import": {"session": "elsewhere", "secret": "ca"}},
        {"name": "leaf", "kind": "x509", "issuer": "ca"}]), "imported"),
    ("secrets[0].value", _set("secrets", value=[
        {"name": "fragment", "kind": "config-fragment", "value": {"a": "$$SCONE::nope$$"}}]),
     "no secret named 'nope'"),
    ("access_policy", _set("access_policy", value=PLACEHOLDER), "placeholder"),
    ("services[0].environment.IEXEC_TASK_ID", lambda d: d["services"][0]["environment"].update(
        IEXEC_TASK_ID="task-1", IEXEC_OUT="/encryptedOutputs"), "task id"),
    ("services[0].environment.IEXEC_OUT", lambda d: d["services"][0]["environment"].update(
        IEXEC_TASK_ID="0x" + "ab" * 32, IEXEC_OUT="/iexec_out"), "/iexec_out"),
    ("digest", _set("digest", value="ab" * 32), "pins nothing"),
]


def document_with(edit: Edit) -> str:
    document = copy.deepcopy(SessionDoc(unique_name("enforced")).as_dict())
    edit(document)
    return yaml.safe_dump(document, sort_keys=False)


@pytest.mark.parametrize(("path", "edit", "word"), UNENFORCED,
                         ids=[f"{case[0]}-{index}" for index, case in enumerate(UNENFORCED)])
def test_each_unenforced_key_is_refused_with_its_path_and_line(
        path: str, edit: Edit, word: str) -> None:
    text = document_with(edit)
    parse_session(text)  # the language accepts it: only enforcement refuses
    with pytest.raises(SessionError) as caught:
        parse_enforceable_session(text, source="doc.yml")
    error = caught.value
    assert error.path == path
    assert word in error.detail
    assert error.line is not None
    key = path.rsplit(".", 1)[-1].split("[")[0].replace("\\", "").strip("@")
    line = text.splitlines()[error.line - 1].replace("\\", "")
    assert key in line or line.strip() == "- /etc/app.conf", line  # a bare path has no key


def test_the_plain_document_is_enforceable() -> None:
    text = document_with(lambda _: None)
    assert unenforced(parse_session(text)) == []
    assert parse_enforceable_session(text) == parse_session(text)


def test_several_unenforced_keys_are_all_named() -> None:
    def both(document: dict[str, Any]) -> None:
        _set("volumes", 0, "update_policy", value="ephemeral")(document)
        _set("security", "singleton_enclaves", value=True)(document)
    with pytest.raises(SessionError, match=r"would not enforce volumes\[0\]\.update_policy"):
        parse_enforceable_session(document_with(both))


def test_the_seed_template_is_enforceable() -> None:
    filled = fill_template(SEED_TEMPLATE, {
        "SESSION": "seed", "INPUT_FSPF_KEY": "aa" * 32, "INPUT_FSPF_TAG": "bb" * 16,
        "OUTPUT_FSPF_KEY": "cc" * 32, "OUTPUT_FSPF_TAG": "dd" * 16})
    assert parse_enforceable_session(filled).name == "seed"


# -- the published corpora ------------------------------------------------------------

SHARED = Path(__file__).resolve().parents[2] / "shared" / "testdata"
CORPORA = {
    "scone-sessions": {"01", "02", "07", "11", "12", "19", "20", "24", "25", "26", "27", "28"},
    "conformance/sessions": {"01", "06", "09", "10", "11", "12", "13", "14", "19", "20", "24",
                             "26", "32", "33"},
}


@pytest.mark.parametrize("corpus", sorted(CORPORA))
def test_corpus_refusals_come_only_from_the_table(corpus: str) -> None:
    folder = SHARED / corpus
    files = sorted(folder.glob("*.yml"))
    if not files:
        pytest.skip(f"{folder} not found")
    enforceable = set()
    for path in files:
        text = path.read_text(encoding="utf-8")
        try:
            session = parse_session(text, source=path.name)
        except SessionError:
            continue  # not a valid session at all: the language tests cover these
        findings = unenforced(session)
        try:
            parse_enforceable_session(text, source=path.name)
        except SessionError as error:
            # Refused exactly for the first key the table names, never for another reason.
            assert findings and error.path == _formatted(findings[0].path), path.name
            continue
        assert not findings
        enforceable.add(path.name[:2])
    assert enforceable == CORPORA[corpus]


def _formatted(path: tuple[str | int, ...]) -> str:
    from tdapp.policy.reader import format_path

    return format_path(path)


# -- the CLI and the CAS ----------------------------------------------------------------


def test_session_check_names_the_key_and_line(tmp_path: Path,
                                              cli: Callable[..., CliResult]) -> None:
    bad = tmp_path / "bad.yml"
    bad.write_text(document_with(_set("volumes", 1, "update_policy", value="ephemeral")))
    result = cli("session", "check", str(bad))
    assert result.code == 3, result.err
    assert "volumes[1].update_policy" in result.err and f"{bad}:" in result.err
    assert "Traceback" not in result.err
    good = tmp_path / "good.yml"
    good.write_text(document_with(lambda _: None))
    result = cli("session", "check", str(good))
    assert result.code == 0 and "enforceable" in result.out


@pytest.fixture(scope="module")
def owner(cas_server: StartCas, user: MakeUser) -> tuple[CasServer, User]:
    server = cas_server()
    alice = user("alice-enforced")
    alice.attest(server)
    return server, alice


@pytest.mark.parametrize("case", [UNENFORCED[0], UNENFORCED[13], UNENFORCED[20]],
                         ids=["mode-maa", "ephemeral", "pgp-key"])
def test_the_cas_refuses_and_stores_nothing(owner: tuple[CasServer, User],
                                            case: tuple[str, Edit, str]) -> None:
    server, alice = owner
    path, edit, _ = case
    text = document_with(edit)
    name = yaml.safe_load(text)["name"]
    with alice.http(server) as http:
        created = http.post("/v1/sessions", content=text.encode())
        assert created.status_code == 400, created.text
        assert created.json()["kind"] == "input" and path in created.json()["reason"]
        missing = http.get(f"/v1/sessions/{name}")
        assert missing.status_code == 404, missing.text
        # Nor can an update sneak the key into a stored session.
        made = http.post("/v1/sessions", content=SessionDoc(name).body())
        assert made.status_code == 201, made.text
        edited = yaml.safe_load(text)
        edited["predecessor"] = made.json()["hash"]
        updated = http.put(f"/v1/sessions/{name}", content=json.dumps(edited).encode())
        assert updated.status_code == 400, updated.text
        assert updated.json()["kind"] == "input" and path in updated.json()["reason"]
        read = http.get(f"/v1/sessions/{name}")
        assert read.status_code == 200 and read.json()["hash"] == made.json()["hash"]


def test_image_measurements_are_checked_too(
        world: tuple[CasServer, User], las: str) -> None:  # noqa: F811 - fixtures
    """The 2018 form lists mrenclaves on the image as well: code matching only the
    service's list gets nothing."""
    server, alice = world
    doc = SessionDoc(unique_name("image-mrenclaves"))
    document = doc.as_dict()
    document["images"][0]["mrenclaves"] = [OTHER]
    with alice.http(server) as http:
        created = http.post("/v1/sessions", content=json.dumps(document).encode())
    assert created.status_code == 201, created.text
    nonce = new_nonce(server, doc.name)
    key = EphemeralKey()
    response = attempt(server, doc.name, evidence(las, bind(nonce, key, doc.name)),
                       nonce, key)
    refused(server, world, response, 403, "is not one of the session's mrenclaves", doc.name,
            told=f"measurement {MRENCLAVE} is not one the service's image accepts")


def test_a_stated_creator_must_be_the_real_one(owner: tuple[CasServer, User]) -> None:
    """A document claiming another creator is not stored with that claim unchecked."""
    server, alice = owner
    doc = SessionDoc(unique_name("creator"))
    claimed = {**doc.as_dict(), "creator": "ab" * 32}
    with alice.http(server) as http:
        refused = http.post("/v1/sessions", content=json.dumps(claimed).encode())
        assert refused.status_code == 400 and "creator: the document names" in \
            refused.json()["reason"], refused.text
        assert http.get(f"/v1/sessions/{doc.name}").status_code == 404
        own = {**doc.as_dict(), "creator": alice.identity}
        made = http.post("/v1/sessions", content=json.dumps(own).encode())
        assert made.status_code == 201, made.text
        update = {**claimed, "predecessor": made.json()["hash"]}
        assert http.put(f"/v1/sessions/{doc.name}",
                        content=json.dumps(update).encode()).status_code == 400
        assert http.get(f"/v1/sessions/{doc.name}").json()["hash"] == made.json()["hash"]

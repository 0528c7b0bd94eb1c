"""Secrets, exports and imports at the CAS, attacked over real HTTPS with real LAS evidence.

What is promised (docs/secrets.md): the CAS makes a session's secrets, fills in
references only in the configuration it encrypts to an attested instance,
never shows a made value to a reader (unless ``export_public``), keeps one
across an update only with ``migrate: true``, and gives another session's
instance a secret or volume only while the exporter's current session exports
it to exactly that session (and hash); an imported volume is read-only.
"""

from __future__ import annotations

import json
import sqlite3
from typing import Any

import pytest
from cas_fixtures import (
    MRENCLAVE,
    CasServer,
    MakeUser,
    SessionDoc,
    User,
    anonymous_http,
    unique_name,
)
from cryptography import x509
from test_cas_attestation import (  # noqa: F401 - las and world are fixtures
    attempt,
    bind,
    evidence,
    las,
    new_nonce,
    world,
)

from tdapp.attest.release import ReleasedConfiguration
from tdapp.client.key_release import EphemeralKey

SECRETS = [
    {"name": "api_key", "kind": "ascii", "size": 40},
    {"name": "seed", "kind": "binary", "size": 16},
    {"name": "given", "kind": "ascii", "value": "written-by-the-owner"},
    {"name": "signing", "kind": "private-key", "key_type": "P-384"},
    {"name": "ca", "kind": "x509-ca", "common_name": "test CA", "export_public": True},
    {"name": "server", "kind": "x509", "issuer": "ca", "dns": ["app.example"]},
]
ENVIRONMENT = {"API_KEY": "Bearer $$SCONE::api_key$$", "SEED": "$$SCONE::seed:hex$$",
               "GIVEN": "$$SCONE::given$$", "PUB": "$$SCONE::signing:publickey:base64$$"}
FILE = "cert=$$SCONE::server:crt$$\nchain=$$SCONE::server:chain$$\nkey=$$SCONE::server.key$$\n"


def document(name: str, *, secrets: list[dict[str, Any]] | None = None,
             environment: dict[str, str] | None = None, injected: str | None = FILE,
             predecessor: str | None = None) -> dict[str, Any]:
    doc = SessionDoc(name, injected=injected, predecessor=predecessor).as_dict()
    doc["services"][0]["environment"].update(ENVIRONMENT if environment is None
                                              else environment)
    doc["secrets"] = SECRETS if secrets is None else secrets
    return doc


def post(user: User, server: CasServer, doc: dict[str, Any]) -> Any:
    with user.http(server) as http:
        return http.post("/v1/sessions", content=json.dumps(doc).encode())


def put(user: User, server: CasServer, doc: dict[str, Any]) -> Any:
    with user.http(server) as http:
        return http.put(f"/v1/sessions/{doc['name']}", content=json.dumps(doc).encode())


def released(server: CasServer, las: str, name: str) -> tuple[Any, ReleasedConfiguration | None]:  # noqa: F811
    nonce = new_nonce(server, name)
    key = EphemeralKey()
    answer = attempt(server, name, evidence(las, bind(nonce, key, name)), nonce, key)
    return answer, (key.open(answer.json()["jwe"]) if answer.status_code == 200 else None)


def configuration(server: CasServer, las: str, name: str) -> ReleasedConfiguration:  # noqa: F811
    answer, config = released(server, las, name)
    assert config is not None, answer.text
    return config


def audit(user: User, server: CasServer, name: str) -> list[dict[str, Any]]:
    with user.http(server) as http:
        events: list[dict[str, Any]] = http.get(f"/v1/audit?session={name}").json()["events"]
    return events


@pytest.fixture(scope="module")
def bob(world: tuple[CasServer, User], user: MakeUser) -> User:  # noqa: F811
    server, _ = world
    other = user("bob-secrets")
    other.attest(server)
    return other


def test_made_secrets_reach_only_the_attested_configuration(
        world: tuple[CasServer, User], las: str) -> None:  # noqa: F811
    server, alice = world
    name = unique_name("secrets")
    created = post(alice, server, document(name))
    assert created.status_code == 201, created.text
    config = configuration(server, las, name)
    env = config.environment
    api_key = env["API_KEY"].removeprefix("Bearer ")
    assert len(api_key) == 40 and api_key.isalnum()
    assert len(bytes.fromhex(env["SEED"])) == 16
    assert env["GIVEN"] == "written-by-the-owner"
    content = config.injection_files[0].content.get_secret_value().decode()
    certificate = x509.load_pem_x509_certificate(content.split("cert=")[1].encode())
    chain = x509.load_pem_x509_certificates(content.split("chain=")[1].split("key=")[0].encode())
    assert chain[0] == certificate and len(chain) == 2
    certificate.verify_directly_issued_by(chain[1])
    assert "-----BEGIN PRIVATE KEY-----" in content.split("key=")[1]
    # The same values at the next attestation: made once, at creation.
    again = configuration(server, las, name)
    assert again.environment == env
    # A reader of the session sees neither made value, in the session or its audit log;
    # the export_public CA shows its certificate, and only that.
    with alice.http(server) as http:
        read = http.get(f"/v1/sessions/{name}")
    assert read.status_code == 200
    for value in (api_key, env["SEED"], env["PUB"], content.split("key=")[1].strip()):
        assert value not in read.text
        assert value not in json.dumps(audit(alice, server, name))
    public = read.json()["public_secrets"]
    assert set(public) == {"ca"} and x509.load_pem_x509_certificate(
        public["ca"].encode()) == chain[1]
    # Nor is a made value in the CAS's database: it is sealed there.
    database = server.state_dir / "cas.db"
    for path in database.parent.glob("cas.db*"):
        assert api_key.encode() not in path.read_bytes()


def test_a_binary_secret_goes_into_an_injected_file_as_its_raw_bytes(
        world: tuple[CasServer, User], las: str) -> None:  # noqa: F811
    server, alice = world
    name = unique_name("raw")
    secrets = [{"name": "blob", "kind": "binary", "value": "00ff10"}]
    created = post(alice, server, document(name, secrets=secrets, environment={
        "BLOB": "$$SCONE::blob:base64$$"}, injected="<$$SCONE::blob$$>"))
    assert created.status_code == 201, created.text
    config = configuration(server, las, name)
    assert config.injection_files[0].content.get_secret_value() == b"<\x00\xff\x10>"
    assert config.environment["BLOB"] == "AP8Q"
    # Bytes are not text: the bare form is refused where text goes.
    refused = post(alice, server, document(unique_name("raw"), secrets=secrets, environment={
        "BLOB": "$$SCONE::blob$$"}, injected=None))
    assert refused.status_code == 400 and "only an injected file" in refused.json()["reason"]


def test_an_update_keeps_a_made_secret_only_with_migrate(
        world: tuple[CasServer, User], las: str) -> None:  # noqa: F811
    server, alice = world
    name = unique_name("migrate")
    secrets = [{"name": "kept", "kind": "ascii", "size": 20, "migrate": True},
               {"name": "fresh", "kind": "ascii", "size": 20}]
    environment = {"KEPT": "$$SCONE::kept$$", "FRESH": "$$SCONE::fresh$$"}
    created = post(alice, server, document(name, secrets=secrets, environment=environment,
                                           injected=None))
    assert created.status_code == 201, created.text
    before = configuration(server, las, name).environment
    updated = put(alice, server, document(name, secrets=secrets, environment=environment,
                                          injected=None, predecessor=created.json()["hash"]))
    assert updated.status_code == 200, updated.text
    after = configuration(server, las, name).environment
    assert after["KEPT"] == before["KEPT"]
    assert after["FRESH"] != before["FRESH"]


def test_a_reference_to_a_missing_secret_or_in_a_command_is_refused_and_nothing_stored(
        world: tuple[CasServer, User]) -> None:  # noqa: F811
    server, alice = world
    for doc, word in [
            (document(unique_name("missing"), environment={"X": "$$SCONE::nope$$"}),
             "no secret named 'nope'"),
            (document(unique_name("command"), environment={}), "command line is public")]:
        if word.startswith("command"):
            doc["services"][0]["command"] = "/application $$SCONE::api_key$$"
        answer = post(alice, server, doc)
        assert answer.status_code == 400 and word in answer.json()["reason"], answer.text
        with alice.http(server) as http:
            assert http.get(f"/v1/sessions/{doc['name']}").status_code == 404


def _exporter(alice: User, server: CasServer, importer: str, **target: str) -> str:
    name = unique_name("exporter")
    secrets = [{"name": "shared", "kind": "ascii", "size": 24,
                **({"export": [{"session": importer, **target}]} if importer else {})},
               {"name": "private", "kind": "ascii", "size": 24}]
    doc = document(name, secrets=secrets, environment={"S": "$$SCONE::shared$$"},
                   injected=None)
    created = post(alice, server, doc)
    assert created.status_code == 201, created.text
    return name


def _importer(bob: User, server: CasServer, name: str, exporter: str,
              secret: str = "shared") -> str:
    doc = document(name, secrets=[{"name": "theirs", "import": {"session": exporter,
                                                                 "secret": secret}}],
                   environment={"THEIRS": "$$SCONE::theirs$$"}, injected=None)
    created = post(bob, server, doc)
    assert created.status_code == 201, created.text
    return str(created.json()["hash"])


def test_an_import_gets_the_secret_only_while_the_exporter_exports_it(
        world: tuple[CasServer, User], bob: User, las: str) -> None:  # noqa: F811
    server, alice = world
    importer = unique_name("importer")
    exporter = _exporter(alice, server, importer)
    _importer(bob, server, importer, exporter)
    shared = configuration(server, las, exporter).environment["S"]
    assert configuration(server, las, importer).environment["THEIRS"] == shared
    # Both logs say so; neither holds the value.
    assert any(e["event"] == "export" and e["outcome"] == "accepted" and importer in e["reason"]
               for e in audit(alice, server, exporter))
    assert any(e["event"] == "import" for e in audit(bob, server, importer))
    assert shared not in json.dumps(audit(alice, server, exporter) + audit(bob, server, importer))
    # A secret it does not export is not released, and the anonymous caller learns nothing
    # of the exporter; a reader of the importer is told the reason.
    other = unique_name("importer")
    _importer(bob, server, other, exporter, secret="private")
    answer, config = released(server, las, other)
    assert config is None and answer.status_code == 403
    assert exporter not in answer.json()["reason"]
    assert any(e["outcome"] == "refused" and "does not export" in e["reason"]
               for e in audit(bob, server, other))
    assert any(e["outcome"] == "refused" and other in e["reason"]
               for e in audit(alice, server, exporter))
    # The exporter removes the export (an update of its own session): cut off at once.
    with alice.http(server) as http:
        current = http.get(f"/v1/sessions/{exporter}").json()["hash"]
    without = document(exporter, secrets=[{"name": "shared", "kind": "ascii", "size": 24,
                                           "migrate": True},
                                          {"name": "private", "kind": "ascii", "size": 24}],
                       environment={"S": "$$SCONE::shared$$"}, injected=None,
                       predecessor=current)
    assert put(alice, server, without).status_code == 200
    answer, config = released(server, las, importer)
    assert config is None and answer.status_code == 403, answer.text


def test_an_export_pinned_to_a_hash_stops_when_the_importer_changes(
        world: tuple[CasServer, User], bob: User, las: str) -> None:  # noqa: F811
    server, alice = world
    importer = unique_name("pinned")
    # Bob creates first; Alice pins what she has reviewed.
    placeholder = _exporter(alice, server, "")
    digest = _importer(bob, server, importer, placeholder)
    exporter = _exporter(alice, server, importer, session_hash=digest)
    doc = document(importer, secrets=[{"name": "theirs", "import": {"session": exporter,
                                                                     "secret": "shared"}}],
                   environment={"THEIRS": "$$SCONE::theirs$$"}, injected=None,
                   predecessor=digest)
    updated = put(bob, server, doc)
    assert updated.status_code == 200, updated.text
    pinned_hash = updated.json()["hash"]
    # The export pins the hash Bob had when Alice reviewed it, not this one.
    answer, config = released(server, las, importer)
    assert config is None and answer.status_code == 403
    assert pinned_hash != digest


def test_a_namespace_export_reaches_only_sessions_in_it(
        world: tuple[CasServer, User], las: str) -> None:  # noqa: F811
    server, alice = world
    namespace = unique_name("ns")
    made = post(alice, server, {"name": namespace, "version": "0.3",
                                "access_policy": {"read": ["CREATOR"], "update": ["CREATOR"],
                                                  "create_sessions": ["CREATOR"]}})
    assert made.status_code == 201, made.text
    exporter = unique_name("nsexp")
    doc = document(exporter, secrets=[{"name": "shared", "kind": "ascii", "size": 24,
                                       "export": [{"namespace": namespace}]}],
                   environment={}, injected=None)
    assert post(alice, server, doc).status_code == 201
    inside = f"{namespace}/child"
    outside = unique_name(f"{namespace}x")  # a name that merely starts the same
    for name in (inside, outside):
        importer = document(name, secrets=[{"name": "theirs", "import": {
            "session": exporter, "secret": "shared"}}], environment={"T": "$$SCONE::theirs$$"},
            injected=None)
        assert post(alice, server, importer).status_code == 201
    assert configuration(server, las, inside).environment["T"]
    answer, config = released(server, las, outside)
    assert config is None and answer.status_code == 403


def test_an_imported_volume_is_released_read_only_and_its_tag_never_moved_by_the_importer(
        world: tuple[CasServer, User], bob: User, las: str) -> None:  # noqa: F811
    server, alice = world
    importer = unique_name("volimp")
    dataset = unique_name("dataset")
    key, tag = "ab" * 32, "cd" * 16
    made = post(alice, server, {"name": dataset, "version": "0.3", "volumes": [
        {"name": "data", "fspf_key": key, "fspf_tag": tag, "export": [{"session": importer}]}]})
    assert made.status_code == 201, made.text
    doc = SessionDoc(importer).as_dict()
    doc["volumes"].append({"name": "data", "import": {"session": dataset, "volume": "data"}})
    doc["images"][0]["volumes"].append({"name": "data", "path": "/data"})
    assert post(bob, server, doc).status_code == 201
    answer, config = released(server, las, importer)
    assert config is not None, answer.text
    grant = config.grant("data")
    assert grant is not None and not grant.writable
    assert (grant.key.hex(), grant.tag and grant.tag.hex()) == (key, tag)
    with anonymous_http(server) as http:
        moved = http.put("/v1/volume-tags", json={"session": importer, "volume": "data",
                                                  "old": tag, "new": "ee" * 16},
                         headers={"Authorization": f"Bearer {config.token.get_secret_value()}"})
        assert moved.status_code == 403 and "imported" in moved.json()["reason"], moved.text
        # Nor through the exporter's name: the token is of another session.
        moved = http.put("/v1/volume-tags", json={"session": dataset, "volume": "data",
                                                  "old": tag, "new": "ee" * 16},
                         headers={"Authorization": f"Bearer {config.token.get_secret_value()}"})
        assert moved.status_code == 403, moved.text
    with alice.http(server) as http:
        now = http.get(f"/v1/volume-tags?session={dataset}&volume=data").json()["tag"]
    assert now == tag


def test_a_database_writer_cannot_move_sealed_secrets_between_sessions(
        world: tuple[CasServer, User], las: str) -> None:  # noqa: F811
    server, alice = world
    source, target = unique_name("victim"), unique_name("thief")
    env = {"S": "$$SCONE::shared$$"}
    for name in (source, target):
        doc = document(name, secrets=[{"name": "shared", "kind": "ascii", "size": 24}],
                       environment=env, injected=None)
        assert post(alice, server, doc).status_code == 201
    victim = configuration(server, las, source).environment["S"]
    with sqlite3.connect(server.state_dir / "cas.db") as db:
        (sealed,) = db.execute("SELECT sealed_secrets FROM sessions WHERE name = ?",
                               (source,)).fetchone()
        db.execute("UPDATE sessions SET sealed_secrets = ? WHERE name = ?", (sealed, target))
    answer, config = released(server, las, target)
    assert config is None, "a sealed value moved to another session was released"
    assert victim not in answer.text and answer.status_code >= 400


def test_the_released_workload_still_binds(
        world: tuple[CasServer, User], las: str) -> None:  # noqa: F811
    server, alice = world
    name = unique_name("workload")
    assert post(alice, server, document(name)).status_code == 201
    assert configuration(server, las, name).workload == MRENCLAVE



def test_an_import_pinned_to_the_exporters_hash_and_a_re_export_are_refused(
        world: tuple[CasServer, User], bob: User, las: str) -> None:  # noqa: F811
    server, alice = world
    importer = unique_name("pin-exporter")
    exporter = _exporter(alice, server, importer)
    with alice.http(server) as http:
        stale = http.get(f"/v1/sessions/{exporter}").json()["hash"]
    # Pinned to the exporter's current hash: released.
    doc = document(importer, secrets=[{"name": "theirs", "import": {
        "session": exporter, "secret": "shared", "session_hash": stale}}],
        environment={"T": "$$SCONE::theirs$$"}, injected=None)
    assert post(bob, server, doc).status_code == 201
    assert configuration(server, las, importer).environment["T"]
    # The exporter changes: the pinned import gets nothing.
    relay, third = unique_name("relay"), unique_name("third")
    changed = document(exporter, secrets=[
        {"name": "shared", "kind": "ascii", "size": 24,
         "export": [{"session": importer}, {"session": relay}]},
        {"name": "private", "kind": "ascii", "size": 25}],
        environment={"S": "$$SCONE::shared$$"}, injected=None, predecessor=stale)
    assert put(alice, server, changed).status_code == 200
    answer, config = released(server, las, importer)
    assert config is None and answer.status_code == 403
    # A session that imports a secret (and may: it is exported to it) cannot pass it on:
    # only its maker exports it.
    relayed = document(relay, secrets=[{"name": "theirs", "import": {
        "session": exporter, "secret": "shared"}, "export": [{"session": third}]}],
        environment={}, injected=None)
    assert post(bob, server, relayed).status_code == 201
    assert configuration(server, las, relay) is not None
    _importer(bob, server, third, relay, secret="theirs")
    answer, config = released(server, las, third)
    assert config is None and answer.status_code == 403
    assert any("holds no value of its own" in e["reason"] for e in audit(bob, server, third))


def test_a_session_cannot_make_the_cas_generate_keys_without_bound(
        world: tuple[CasServer, User]) -> None:  # noqa: F811
    server, alice = world
    many = [{"name": f"k{index}", "kind": "private-key", "key_type": "RSA-3072"}
            for index in range(40)]
    doc = document(unique_name("costly"), secrets=many, environment={}, injected=None)
    answer = post(alice, server, doc)
    assert answer.status_code == 400 and "at most" in answer.json()["reason"], answer.text
    with alice.http(server) as http:
        assert http.get(f"/v1/sessions/{doc['name']}").status_code == 404

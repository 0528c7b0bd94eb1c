"""What a live CAS keeps on disk, what survives a restart, and whom a client will talk to.

The database (SQLite files, or a ``pg_dump`` of PostgreSQL) must not hold any
volume key, secret or injected file in plaintext; a restarted CAS serves the
same sessions under the same certificate; a client talks only to the CAS
certificate it pinned, and sends nothing at all to anything else.
"""

from __future__ import annotations

import base64
import contextlib
import json
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cas_fixtures import (
    CasServer,
    MakeUser,
    Postgres,
    RecordingTlsServer,
    SessionDoc,
    StartCas,
    User,
    anonymous_http,
    certificate_fingerprint,
    child_environment,
    free_port,
    presented_fingerprint,
    unique_name,
)
from conftest import CliResult, assert_error

from tdapp.client.key_release import EphemeralKey
from tdapp.errors import ExitCode
from tdapp.tls import new_private_key, save_certificate, save_private_key, self_signed


@dataclass
class Stored:
    server: CasServer
    alice: User
    database: Callable[[], dict[str, bytes]]


def sqlite_files(server: CasServer) -> dict[str, bytes]:
    files = {path.name: path.read_bytes() for path in server.state_dir.glob("cas.db*")}
    assert "cas.db" in files, sorted(p.name for p in server.state_dir.iterdir())
    return files


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def stored(request: pytest.FixtureRequest, cas_server: StartCas,
           user: MakeUser) -> Iterator[Stored]:
    if request.param == "postgresql":
        postgres: Postgres = request.getfixturevalue("postgres")
        url = postgres.create_database()
        server = cas_server(db=url)
        database_name = url.rsplit("/", 1)[1]

        def database() -> dict[str, bytes]:
            return {"pg_dump": postgres.dump(database_name)}
    else:
        server = cas_server()

        def database() -> dict[str, bytes]:
            return sqlite_files(server)
    alice = user(f"alice-{request.param}")
    alice.attest(server)
    yield Stored(server, alice, database)
    server.stop()


def secret_doc(name: str | None = None, **changes: object) -> SessionDoc:
    doc = SessionDoc(name or unique_name("secretive"),
                     secret="Sekr3t-" + unique_name("value"),
                     injected="db_password=" + unique_name("injected"))
    for key, value in changes.items():
        setattr(doc, key, value)
    return doc


def needles(doc: SessionDoc) -> dict[str, bytes]:
    """Everything of ``doc`` that must never be in the database in the clear."""
    found: dict[str, bytes] = {}
    for volume, key in doc.keys.items():
        found[f"{volume} key (hex)"] = key.encode()
        found[f"{volume} key (HEX)"] = key.upper().encode()
        found[f"{volume} key (raw bytes)"] = bytes.fromhex(key)
    assert doc.secret is not None and doc.injected is not None
    found["secret value"] = doc.secret.encode()
    found["injected file content"] = doc.injected.encode()
    return found


def leaks(blobs: dict[str, bytes], secrets: dict[str, bytes]) -> list[str]:
    return [f"{what} found in {where}" for where, blob in blobs.items()
            for what, needle in secrets.items() if needle in blob]


def put(alice: User, server: CasServer, doc: SessionDoc, *, create: bool) -> str:
    with alice.http(server) as http:
        response = http.post("/v1/sessions", content=doc.body()) if create else \
            http.put(f"/v1/sessions/{doc.name}", content=doc.body())
    assert response.status_code == (201 if create else 200), response.text
    return str(response.json()["hash"])


def test_the_database_holds_no_key_secret_or_injected_file_in_plaintext(stored: Stored) -> None:
    server, alice = stored.server, stored.alice
    first = secret_doc()
    h1 = put(alice, server, first, create=True)
    second = secret_doc(first.name, predecessor=h1, command="/rev2")
    put(alice, server, second, create=False)
    master_key = (server.state_dir / "master.key").read_text().strip()

    blobs = stored.database()
    secrets = {**needles(first), **{f"rev2 {k}": v for k, v in needles(second).items()},
               "master key (hex)": master_key.encode(),
               "master key (raw bytes)": bytes.fromhex(master_key)}
    assert leaks(blobs, secrets) == []
    # The search looked at the right data: the clear parts are there.
    everything = b"".join(blobs.values())
    assert first.name.encode() in everything
    assert second.tags["encrypted-input-files"].encode() in everything


def test_refused_documents_leave_no_key_material_in_the_database(stored: Stored) -> None:
    """Refusals are audited with their reason; a reason must not carry the document's values."""
    server, alice = stored.server, stored.alice
    # Valid keys and secrets, but an unknown key elsewhere.
    unknown = secret_doc()
    unknown_body = unknown.text() + "surprise: 1\n"
    # A key that is one byte too long, and a binary secret that is not hex.
    long_key = secret_doc()
    long_key_body = long_key.text().replace(long_key.keys["encrypted-input-files"],
                                            long_key.keys["encrypted-input-files"] + "00")
    not_hex = secret_doc()
    not_hex_body = (not_hex.text() + "secrets:\n- name: api_token\n  kind: binary\n"
                    f"  value: {not_hex.secret}\n")
    with alice.http(server) as http:
        for body in (unknown_body, long_key_body, not_hex_body):
            response = http.post("/v1/sessions", content=body.encode())
            assert response.status_code == 400, response.text
            assert response.json()["kind"] == "input", response.text
            reason = response.json()["reason"]
            for what, needle in {**needles(unknown), **needles(long_key),
                                 **needles(not_hex)}.items():
                assert needle.decode(errors="replace") not in reason, (what, reason)
    blobs = stored.database()
    assert leaks(blobs, {**needles(unknown), **needles(long_key), **needles(not_hex)}) == []
    assert b"surprise" in b"".join(blobs.values()), "the refusal was not audited"


def test_a_restarted_cas_serves_every_session_under_the_same_certificate(
        stored: Stored) -> None:
    server, alice = stored.server, stored.alice
    docs = [secret_doc() for _ in range(3)]
    hashes = {doc.name: put(alice, server, doc, create=True) for doc in docs}
    before = server.fingerprint
    assert presented_fingerprint(server.host, server.port) == before

    server.stop()
    if server.db is None:  # at rest, after the checkpoint on close
        everything = {name: blob for name, blob in sqlite_files(server).items()}
        assert leaks(everything, {k: v for d in docs for k, v in needles(d).items()}) == []
    server.start()

    assert server.fingerprint == before
    assert presented_fingerprint(server.host, server.port) == before
    with alice.http(server) as http:
        for doc in docs:
            response = http.get(f"/v1/sessions/{doc.name}")
            assert response.status_code == 200, response.text
            assert response.json()["hash"] == hashes[doc.name]
            assert doc.command in response.json()["session"]
    # The pinned client (the real CLI) still trusts it.
    result = alice.tdapp("session", "read", docs[0].name, "--cas", server.address)
    assert result.code == 0, result.err
    assert docs[0].name in result.out


# -- pins -------------------------------------------------------------------------------


def assert_attest_refused(result: CliResult, *fragments: str) -> None:
    """``cas attest`` first notes what the CAS presents, then fails with one error line."""
    assert result.code == ExitCode.REFUSED, (result.code, result.err)
    assert result.out == ""
    lines = result.err.splitlines()
    assert lines and lines[-1].startswith("tdapp: error: "), result.err
    assert [line for line in lines if line.startswith("tdapp: error:")] == lines[-1:]
    assert "Traceback" not in result.err
    for fragment in fragments:
        assert fragment in lines[-1], result.err


@pytest.fixture(scope="module")
def cas(cas_server: StartCas) -> CasServer:
    return cas_server()


@pytest.fixture
def impostor(tmp_path: Path) -> Iterator[RecordingTlsServer]:
    """A TLS server with a certificate of its own, recording whatever it is sent."""
    key = new_private_key()
    save_private_key(key, tmp_path / "impostor.key")
    save_certificate(self_signed(key, "tdapp CAS", hosts=("127.0.0.1", "localhost")),
                     tmp_path / "impostor.crt")
    server = RecordingTlsServer(tmp_path / "impostor.crt", tmp_path / "impostor.key")
    server.start()
    yield server
    server.stop()


def test_a_client_refuses_a_cas_whose_certificate_is_not_the_pinned_one_and_sends_nothing(
        cas: CasServer, user: MakeUser, impostor: RecordingTlsServer, tmp_path: Path) -> None:
    alice = user("alice-pinned")
    alice.attest(cas)
    # The address Alice pinned (with the real CAS's certificate) is now answered by another.
    address = f"127.0.0.1:{impostor.port}"
    pin = alice.home / "pins" / f"127.0.0.1_{impostor.port}.crt"
    shutil.copyfile(alice.pin_path(cas), pin)
    pinned_bytes = pin.read_bytes()
    impostor_fp = certificate_fingerprint(impostor.certificate.read_text())
    doc = secret_doc()
    (tmp_path / "s.yml").write_text(doc.text())

    for args in (["session", "create", tmp_path / "s.yml"], ["session", "read", doc.name]):
        result = alice.tdapp(*args, "--cas", address)
        assert_error(result, ExitCode.REFUSED, impostor_fp)
        assert cas.fingerprint in result.err, result.err
        assert "refusing" in result.err, result.err

    # Re-attesting without accepting the new fingerprint changes nothing.
    result = alice.tdapp("cas", "attest", address)
    assert_attest_refused(result, impostor_fp, cas.fingerprint)
    assert pin.read_bytes() == pinned_bytes

    assert impostor.handshakes >= 1, "the client never even connected"
    assert [data for data in impostor.received if data] == [], \
        "the client sent application data to a CAS it had not pinned"


def test_a_different_certificate_in_the_pin_file_is_refused(
        cas: CasServer, user: MakeUser, impostor: RecordingTlsServer, tmp_path: Path) -> None:
    alice = user("alice-swapped")
    alice.attest(cas)
    shutil.copyfile(impostor.certificate, alice.pin_path(cas))
    doc = secret_doc()
    (tmp_path / "s.yml").write_text(doc.text())
    result = alice.tdapp("session", "create", tmp_path / "s.yml", "--cas", cas.address)
    assert_error(result, ExitCode.REFUSED, cas.fingerprint)
    assert certificate_fingerprint(impostor.certificate.read_text()) in result.err
    # Nothing reached the real CAS either.
    shutil.copyfile(cas.cert_path, alice.pin_path(cas))
    with alice.http(cas) as http:
        assert http.get(f"/v1/sessions/{doc.name}").status_code == 404


def test_attest_with_a_wrong_fingerprint_pins_nothing(cas: CasServer, user: MakeUser) -> None:
    carol = user("carol")
    last = "1" if cas.fingerprint.endswith("0") else "0"
    for wrong in ("ab" * 32, cas.fingerprint[:16], cas.fingerprint[:-1] + last):
        result = carol.tdapp("cas", "attest", cas.address, "--accept", wrong)
        assert_attest_refused(result, cas.fingerprint)
        assert not carol.pin_path(cas).exists()
        assert list(carol.home.glob("identity/cas/*")) == [], "certified by an unpinned CAS"
    result = carol.tdapp("session", "read", "whatever", "--cas", cas.address)
    assert_error(result, ExitCode.REFUSED, "not pinned")
    # The fingerprint as other tools print it (upper case, colons) is the same fingerprint.
    spelled = ":".join(cas.fingerprint[i:i + 2] for i in range(0, 64, 2)).upper()
    result = carol.tdapp("cas", "attest", cas.address, "--accept", spelled)
    assert result.code == 0, result.err
    assert result.out.strip() == cas.fingerprint
    assert carol.pin_path(cas).read_bytes() == cas.cert_path.read_bytes()


def test_an_unpinned_cas_is_refused_by_session_create(
        cas: CasServer, user: MakeUser, tmp_path: Path) -> None:
    dave = user("dave")
    doc = secret_doc()
    (tmp_path / "s.yml").write_text(doc.text())
    result = dave.tdapp("session", "create", tmp_path / "s.yml", "--cas", cas.address)
    assert_error(result, ExitCode.REFUSED, f"the CAS at {cas.address} (from --cas) is not pinned")
    assert f"tdapp cas attest {cas.address}" in result.err
    assert result.out == ""
    assert not (dave.home / "pins" / f"127.0.0.1_{cas.port}.crt").exists()
    # Nothing was created: once pinned, the name is free (404, not 403).
    dave.attest(cas)
    with dave.http(cas) as http:
        assert http.get(f"/v1/sessions/{doc.name}").status_code == 404


def test_attest_with_a_wrong_fingerprint_fails_even_when_already_pinned(
        cas: CasServer, user: MakeUser) -> None:
    """``--accept FP`` is a check a script relies on: a mismatch must never exit 0."""
    erin = user("erin")
    erin.attest(cas)
    pinned = erin.pin_path(cas).read_bytes()
    result = erin.tdapp("cas", "attest", cas.address, "--accept", "ab" * 32)
    assert_attest_refused(result, cas.fingerprint)
    assert erin.pin_path(cas).read_bytes() == pinned


@pytest.mark.parametrize("key_file", ["master.key", "cas.key", "client-ca.key"])
def test_a_cas_refuses_to_start_with_a_key_file_others_can_read(
        cas_server: StartCas, user: MakeUser, key_file: str) -> None:
    server = cas_server()
    server.stop()
    (server.state_dir / key_file).chmod(0o644)
    done = subprocess.run(
        [sys.executable, "-m", "tdapp", "cas", "serve", "--port", str(free_port()),
         "--state-dir", str(server.state_dir)], capture_output=True, text=True, timeout=60,
        stdin=subprocess.DEVNULL, env=child_environment(server.home), check=False)
    assert_error(CliResult(done.returncode, done.stdout, done.stderr), ExitCode.INPUT,
                 f"{server.state_dir / key_file} is readable by other users")


def _sqlite(server: CasServer, sql: str, *params: object) -> list[tuple[object, ...]]:
    """What someone with write access to the database file (but not master.key) can do."""
    with contextlib.closing(sqlite3.connect(server.state_dir / "cas.db", timeout=30)) as db:
        rows = db.execute(sql, params).fetchall()
        db.commit()
    return rows


def test_a_database_writer_cannot_take_over_a_session(
        cas: CasServer, user: MakeUser) -> None:
    """Rewriting ``creator`` in the database must not hand the session (and its keys) over."""
    owner, mallory = user("owner"), user("mallory")
    owner.attest(cas)
    mallory.attest(cas)
    doc = secret_doc()
    put(owner, cas, doc, create=True)
    _sqlite(cas, "UPDATE sessions SET creator = ? WHERE name = ?", mallory.identity, doc.name)
    with mallory.http(cas) as http:
        response = http.get(f"/v1/sessions/{doc.name}")
    for what, needle in needles(doc).items():
        assert needle.decode(errors="replace") not in response.text, \
            f"{what} released after a database-only change of the creator"
    assert response.status_code != 200, response.text


def test_a_sealed_record_moved_to_another_row_is_refused(
        cas: CasServer, user: MakeUser) -> None:
    owner = user("owner2")
    owner.attest(cas)
    first, second = secret_doc(), secret_doc()
    put(owner, cas, first, create=True)
    put(owner, cas, second, create=True)
    _sqlite(cas, "UPDATE sessions SET sealed_document = "
                 "(SELECT sealed_document FROM sessions WHERE name = ?) WHERE name = ?",
            first.name, second.name)
    with owner.http(cas) as http:
        response = http.get(f"/v1/sessions/{second.name}")
    assert response.status_code != 200, response.text
    assert response.json()["kind"] == "integrity", response.text
    assert "authentication" in response.json()["reason"], response.text
    assert first.keys["encrypted-input-files"] not in response.text


def test_made_secrets_are_sealed_in_the_database_and_survive_a_restart(stored: Stored) -> None:
    """A value the CAS made is in neither database in the clear, and the same value is
    released after the CAS restarts (sealed rows read back from SQLite or PostgreSQL)."""
    server, alice = stored.server, stored.alice
    doc = SessionDoc(unique_name("made")).as_dict()
    doc["security"] = {"attestation": {"mode": "none"}}
    doc["secrets"] = [{"name": "made", "kind": "ascii", "size": 48},
                      {"name": "tls", "kind": "x509", "common_name": "app"}]
    doc["services"][0]["environment"].update(MADE="$$SCONE::made$$",
                                             KEY="$$SCONE::tls:privatekey:base64$$")
    with alice.http(server) as http:
        created = http.post("/v1/sessions", content=json.dumps(doc).encode())
    assert created.status_code == 201, created.text

    def released() -> dict[str, str]:
        with anonymous_http(server) as http:
            nonce = http.post("/v1/attestation/nonce", json={
                "session": doc["name"], "service": "application"}).json()["nonce"]
            key = EphemeralKey()
            answer = http.post("/v1/attestation", json={
                "session": doc["name"], "service": "application", "nonce": nonce,
                "public_key": key.public_b64url, "workload": "ab" * 32, "evidence": None})
        assert answer.status_code == 200, answer.text
        return dict(key.open(answer.json()["jwe"]).environment)

    first = released()
    assert len(first["MADE"]) == 48
    made = {"made value": first["MADE"].encode(), "made key (base64)": first["KEY"].encode(),
            "made key (DER)": base64.b64decode(first["KEY"])}
    assert leaks(stored.database(), made) == []
    server.stop()
    server.start()
    assert released() == first

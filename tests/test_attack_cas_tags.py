"""Volume tags move only forward, by instances of the services that mount them.

Attacks on a live ``tdapp cas serve`` over HTTPS with real client certificates,
on SQLite and on PostgreSQL: the session's own user reading it back and
updating, a database writer who has the database but not ``master.key``, an
attested instance of one service reporting for another service's volume, and a
second identity claiming names inside a namespace. Each test asserts what the
attack was after did not happen: the tag did not move, nothing was released,
no session was created; not only that a request failed.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy
import yaml
from cas_fixtures import (
    MRENCLAVE,
    CasServer,
    MakeUser,
    Postgres,
    SessionDoc,
    StartCas,
    User,
    anonymous_http,
    unique_name,
)
from cryptography import x509

from tdapp.attest import Workload
from tdapp.cas.store import database_url
from tdapp.client.cas_client import CasClient
from tdapp.client.key_release import EphemeralKey, obtain_configuration
from tdapp.core.address import Address

INPUT, OUTPUT = "encrypted-input-files", "encrypted-output-files"
TAG_CHECK = "failed its integrity check"


@dataclass
class Backend:
    server: CasServer
    alice: User
    bob: User
    database: str  # SQLAlchemy URL of the CAS's database, as a database writer reaches it

    def write_database(self, sql: str, **params: Any) -> list[Any]:
        """What someone with write access to the database (but not master.key) can do."""
        engine = sqlalchemy.create_engine(self.database)
        try:
            with engine.begin() as connection:
                result = connection.execute(sqlalchemy.text(sql), params)
                return list(result.all()) if result.returns_rows else []
        finally:
            engine.dispose()


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest, cas_server: StartCas,
            user: MakeUser) -> Iterator[Backend]:
    db = None
    if request.param == "postgresql":
        postgres: Postgres = request.getfixturevalue("postgres")
        db = postgres.create_database()
    server = cas_server(db=db)
    alice, bob = user(f"alice-{request.param}"), user(f"bob-{request.param}")
    alice.attest(server)
    bob.attest(server)
    yield Backend(server, alice, bob, database_url(db, server.state_dir))
    server.stop()


# -- the session under attack -------------------------------------------------------------


def document(name: str, *, predecessor: str | None = None, tags: dict[str, str] | None = None,
             writer: str = "/writer") -> dict[str, Any]:
    """Two services: ``reader``'s image mounts only the input, ``writer``'s only the output.

    Attestation mode ``none``: these tests are about what an instance may do once it
    has its token, not about evidence.
    """
    base = SessionDoc(name, predecessor=predecessor)
    content = base.as_dict()
    content["security"] = {"attestation": {"mode": "none"}}
    content["services"] = [
        {"name": "reader", "image_name": "reads", "command": "/reader", "pwd": "/"},
        {"name": "writer", "image_name": "writes", "command": writer, "pwd": "/"}]
    content["images"] = [{"name": "reads", "volumes": [{"name": INPUT, "path": "/in"}]},
                         {"name": "writes", "volumes": [{"name": OUTPUT, "path": "/out"}]}]
    content["volumes"] = [{"name": volume, "fspf_key": base.keys[volume],
                           "fspf_tag": (tags or base.tags)[volume]} for volume in (INPUT, OUTPUT)]
    return content


def created_tags(name: str) -> dict[str, str]:
    return SessionDoc(name).tags


def create(backend: Backend, content: dict[str, Any], who: User | None = None) -> str:
    with (who or backend.alice).http(backend.server) as http:
        response = http.post("/v1/sessions", content=json.dumps(content).encode())
    assert response.status_code == 201, response.text
    return str(response.json()["hash"])


def session_hash_now(backend: Backend, name: str) -> str:
    with backend.alice.http(backend.server) as http:
        response = http.get(f"/v1/sessions/{name}")
    assert response.status_code == 200, response.text
    return str(response.json()["hash"])


def current_tag(backend: Backend, name: str, volume: str) -> str | None:
    with backend.alice.http(backend.server) as http:
        response = http.get("/v1/volume-tags", params={"session": name, "volume": volume})
    assert response.status_code == 200, response.text
    tag = response.json()["tag"]
    assert tag is None or isinstance(tag, str)
    return tag


def stored_row(backend: Backend, name: str, volume: str) -> dict[str, Any]:
    rows = backend.write_database(
        "SELECT * FROM volume_tags WHERE session = :s AND volume = :v", s=name, v=volume)
    assert len(rows) == 1, rows
    return dict(rows[0]._mapping)


def audit(backend: Backend, name: str) -> list[dict[str, Any]]:
    rows = backend.write_database(
        "SELECT event, outcome, reason FROM audit_log WHERE session = :s ORDER BY id", s=name)
    return [{"event": e, "outcome": o, "reason": r} for e, o, r in rows]


# -- instances ----------------------------------------------------------------------------


def runtime(server: CasServer) -> CasClient:
    """What a runtime has: the pinned CAS certificate and no client identity."""
    pinned = x509.load_pem_x509_certificate(server.cert_path.read_bytes())
    return CasClient(Address.parse(server.address), pinned, None)


def instance_token(backend: Backend, name: str, service: str) -> str:
    released = obtain_configuration(runtime(backend.server), Workload(MRENCLAVE, name, service),
                                    lambda _d, _m: {})
    return released.token.get_secret_value()


def release(backend: Backend, name: str, service: str) -> httpx.Response:
    """One run's key release, as the runtime asks for it (raw, to see a refusal whole)."""
    key = EphemeralKey()
    with anonymous_http(backend.server) as http:
        nonce = http.post("/v1/attestation/nonce", json={"session": name, "service": service})
        assert nonce.status_code == 201, nonce.text
        return http.post("/v1/attestation", json={
            "session": name, "service": service, "nonce": nonce.json()["nonce"],
            "public_key": key.public_b64url, "workload": MRENCLAVE, "evidence": None})


def report(backend: Backend, token: str, name: str, volume: str, old: str | None,
           new: str) -> httpx.Response:
    with anonymous_http(backend.server) as http:
        return http.put("/v1/volume-tags", headers={"Authorization": f"Bearer {token}"},
                        json={"session": name, "volume": volume, "old": old, "new": new})


def moved_output(backend: Backend, name: str) -> tuple[str, str]:
    """Create the session and let a writer instance move the output tag once.

    Returns (creation-time tag, the tag after the run)."""
    create(backend, document(name))
    first, after_run = created_tags(name)[OUTPUT], secrets.token_hex(16)
    answer = report(backend, instance_token(backend, name, "writer"), name, OUTPUT, first,
                    after_run)
    assert answer.status_code == 200, answer.text
    assert current_tag(backend, name, OUTPUT) == after_run
    return first, after_run


# -- breach 4: an update never moves a tag ------------------------------------------------


def test_read_edit_update_keeps_the_current_tags(backend: Backend, tmp_path: Path) -> None:
    name = unique_name("readback")
    first, after_run = moved_output(backend, name)
    before = session_hash_now(backend, name)
    cas = ("--cas", backend.server.address)

    shown = backend.alice.tdapp("session", "read", name, *cas)
    assert shown.code == 0, shown.err
    assert [line for line in shown.out.splitlines() if line.startswith("predecessor:")] == \
        [f"predecessor: {before}"]
    volumes = {v["name"]: v for v in yaml.safe_load(shown.out)["volumes"]}
    assert volumes[OUTPUT]["fspf_tag"] == after_run and first not in shown.out

    edited = tmp_path / "edited.yml"
    edited.write_text(shown.out.replace("command: /writer", "command: /writer-v2"))
    updated = backend.alice.tdapp("session", "update", edited, *cas)
    assert updated.code == 0, updated.err
    assert session_hash_now(backend, name) == updated.out.strip() != before
    assert current_tag(backend, name, OUTPUT) == after_run
    # And the next release still expects the state the last run left.
    config = release(backend, name, "writer")
    assert config.status_code == 200, config.text


def test_an_update_that_names_an_older_tag_is_refused(backend: Backend) -> None:
    name = unique_name("rollback")
    first, after_run = moved_output(backend, name)
    before = session_hash_now(backend, name)
    stale = document(name, predecessor=before, writer="/writer-v2",
                     tags={INPUT: created_tags(name)[INPUT], OUTPUT: first})
    with backend.alice.http(backend.server) as http:
        response = http.put(f"/v1/sessions/{name}", content=json.dumps(stale).encode())
    assert response.status_code == 409 and response.json()["kind"] == "conflict", response.text
    reason = response.json()["reason"]
    assert f"volume '{OUTPUT}'" in reason and "cannot move a tag" in reason, reason
    assert current_tag(backend, name, OUTPUT) == after_run
    assert session_hash_now(backend, name) == before
    assert any(e["event"] == "session.update" and e["outcome"] == "refused"
               and OUTPUT in e["reason"] for e in audit(backend, name))


# -- breach 5: a database writer can neither roll back nor forge --------------------------


def test_a_database_writer_rolling_a_tag_back_releases_nothing(backend: Backend) -> None:
    name = unique_name("dbroll")
    first, _ = moved_output(backend, name)
    old_run = instance_token(backend, name, "writer")  # still valid, as a saved run's would be
    backend.write_database("UPDATE volume_tags SET tag = :t WHERE session = :s AND volume = :v",
                           t=first, s=name, v=OUTPUT)
    tampered = stored_row(backend, name, OUTPUT)

    refused = release(backend, name, "writer")  # the old run line, started again
    assert refused.status_code != 200 and "jwe" not in refused.json(), refused.text
    assert TAG_CHECK in refused.json()["reason"] and OUTPUT in refused.json()["reason"]
    assert refused.json()["kind"] == "integrity", refused.text
    with backend.alice.http(backend.server) as http:
        shown = http.get("/v1/volume-tags", params={"session": name, "volume": OUTPUT})
    assert shown.status_code != 200 and TAG_CHECK in shown.json()["reason"], shown.text
    assert shown.json()["kind"] == "integrity", shown.text
    # The old run reporting on from the rolled-back tag moves nothing either.
    moved = report(backend, old_run, name, OUTPUT, first, secrets.token_hex(16))
    assert moved.status_code != 200 and TAG_CHECK in moved.json()["reason"], moved.text
    assert moved.json()["kind"] == "integrity", moved.text
    assert stored_row(backend, name, OUTPUT) == tampered  # the CAS wrote nothing over it
    assert sum(TAG_CHECK in e["reason"] for e in audit(backend, name)
               if e["outcome"] == "refused") >= 3


@pytest.mark.parametrize("mac", ["none", "copied from a real instance"])
def test_an_invented_instance_cannot_move_a_tag(backend: Backend, mac: str) -> None:
    name = unique_name("forged")
    create(backend, document(name))
    real = hashlib.sha256(instance_token(backend, name, "writer").encode()).hexdigest()
    token = secrets.token_hex(32)
    invented = hashlib.sha256(token.encode()).hexdigest()
    now = time.time()
    backend.write_database(
        "INSERT INTO instances (token_hash, session, service, measurement, created_at, "
        "expires_at) VALUES (:h, :s, 'writer', 'none', :now, :later)",
        h=invented, s=name, now=now, later=now + 3600)
    if mac != "none":
        backend.write_database(
            "UPDATE instances SET mac = (SELECT mac FROM instances WHERE token_hash = :real) "
            "WHERE token_hash = :h", real=real, h=invented)

    first = created_tags(name)[OUTPUT]
    answer = report(backend, token, name, OUTPUT, first, secrets.token_hex(16))
    assert answer.status_code != 200, answer.text
    assert "instance record" in answer.json()["reason"], answer.text
    assert TAG_CHECK in answer.json()["reason"] and answer.json()["kind"] == "integrity"
    assert current_tag(backend, name, OUTPUT) == first


def test_a_whole_row_put_back_is_the_residual_and_the_audit_log_shows_it(
        backend: Backend) -> None:
    """A MAC cannot tell an older authentic row from the current one; its version can."""
    name = unique_name("wholerow")
    create(backend, document(name))
    saved = stored_row(backend, name, OUTPUT)
    first, after_run = created_tags(name)[OUTPUT], secrets.token_hex(16)
    assert report(backend, instance_token(backend, name, "writer"), name, OUTPUT, first,
                  after_run).status_code == 200
    assert stored_row(backend, name, OUTPUT)["version"] == saved["version"] + 1

    backend.write_database(
        "UPDATE volume_tags SET tag = :t, version = :n, mac = :m WHERE session = :s AND "
        "volume = :v", t=saved["tag"], n=saved["version"], m=saved["mac"], s=name, v=OUTPUT)
    assert current_tag(backend, name, OUTPUT) == first  # the residual: accepted
    # What the operator compares: the last version the audit log records for the volume
    # is newer than the row's.
    logged = [e["reason"] for e in audit(backend, name)
              if e["event"] == "volume.tag" and e["outcome"] == "accepted"]
    assert logged and f"(version {saved['version'] + 1})" in logged[-1], logged
    assert stored_row(backend, name, OUTPUT)["version"] < saved["version"] + 1


# -- breach 6: an instance moves only the volumes its own image mounts --------------------


def test_an_instance_cannot_move_a_volume_its_image_does_not_mount(backend: Backend) -> None:
    name = unique_name("mounts")
    create(backend, document(name))
    first = created_tags(name)
    reader = instance_token(backend, name, "reader")
    answer = report(backend, reader, name, OUTPUT, first[OUTPUT], secrets.token_hex(16))
    assert answer.status_code == 403, answer.text
    assert answer.json()["kind"] == "refused" and "does not mount" in answer.json()["reason"]
    assert current_tag(backend, name, OUTPUT) == first[OUTPUT]
    # Its own volume it may move.
    moved = secrets.token_hex(16)
    assert report(backend, reader, name, INPUT, first[INPUT], moved).status_code == 200
    assert current_tag(backend, name, INPUT) == moved


# -- breach 10: no names below a namespace its owner has not created ----------------------


def test_no_identity_can_claim_names_below_a_namespace(backend: Backend) -> None:
    namespace = unique_name("ns")
    squat = SessionDoc(f"{namespace}/child", command="/squatter")
    with backend.bob.http(backend.server) as http:
        early = http.post("/v1/sessions", content=squat.body())
    assert early.status_code == 403, early.text
    assert early.json()["kind"] == "refused" and "does not exist" in early.json()["reason"]

    owned = SessionDoc(namespace).as_dict()
    owned["access_policy"] = {"read": ["CREATOR"], "update": ["CREATOR"],
                              "create_sessions": ["CREATOR"]}
    create(backend, owned)
    with backend.bob.http(backend.server) as http:
        for doc in (squat, SessionDoc(f"{namespace}/x", command="/squatter")):
            late = http.post("/v1/sessions", content=doc.body())
            assert late.status_code == 403 and "create_sessions" in late.json()["reason"], \
                late.text
    with backend.alice.http(backend.server) as http:
        for child in ("child", "x"):
            assert http.get(f"/v1/sessions/{namespace}/{child}").status_code == 404
        own = SessionDoc(f"{namespace}/own")
        assert http.post("/v1/sessions", content=own.body()).status_code == 201

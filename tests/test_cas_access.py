"""Who may read and change a session on a live CAS, and what the audit log says about it.

Each attack is tried for real against ``tdapp cas serve`` with two (or more)
identities, each in its own ``TDAPP_HOME``; every refusal is checked for its
status, its reason, and for leaving the stored session exactly as it was.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx
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


@dataclass
class World:
    server: CasServer
    alice: User
    bob: User

    def client(self, someone: User) -> httpx.Client:
        return someone.http(self.server)


@pytest.fixture(scope="module")
def world(cas_server: StartCas, user: MakeUser) -> World:
    server = cas_server()
    alice, bob = user("alice"), user("bob")
    alice.attest(server)
    bob.attest(server)
    return World(server, alice, bob)


def create(world: World, doc: SessionDoc, who: User | None = None) -> str:
    with world.client(who or world.alice) as http:
        response = http.post("/v1/sessions", content=doc.body())
    assert response.status_code == 201, response.text
    digest = response.json()["hash"]
    assert isinstance(digest, str)
    return digest


def read(world: World, name: str, who: User | None = None) -> dict[str, Any]:
    with world.client(who or world.alice) as http:
        response = http.get(f"/v1/sessions/{name}")
    assert response.status_code == 200, response.text
    answer = response.json()
    assert isinstance(answer, dict)
    return answer


KIND_OF = {401: "authentication_required", 403: "refused", 409: "conflict"}


def refused(response: httpx.Response, status: int, *fragments: str) -> str:
    assert response.status_code == status, (response.status_code, response.text)
    assert response.json()["kind"] == KIND_OF[status], response.text
    reason = response.json()["reason"]
    assert isinstance(reason, str)
    for fragment in fragments:
        assert fragment in reason, reason
    return reason


def assert_unchanged(world: World, doc: SessionDoc, digest: str) -> None:
    answer = read(world, doc.name)
    assert answer["hash"] == digest
    assert answer["creator"] == world.alice.identity
    assert doc.command in answer["session"]


@pytest.mark.parametrize("path", ["/v1/sessions/{}", "/session/{}",
                                  "/v1/volume-tags?session={}&volume=encrypted-input-files",
                                  "/v1/audit?session={}"])
def test_another_identity_cannot_read(world: World, path: str) -> None:
    doc = SessionDoc(unique_name("private"), command="/alice-only")
    create(world, doc)
    with world.client(world.bob) as http:
        response = http.get(path.format(doc.name))
    refused(response, 403, "access_policy.read", world.bob.identity)
    assert doc.keys["encrypted-input-files"] not in response.text


def test_another_identity_cannot_update_even_by_granting_itself_rights(world: World) -> None:
    doc = SessionDoc(unique_name("guarded"), command="/original")
    digest = create(world, doc)
    # Bob knows the current hash and writes a document that names himself everywhere:
    # the stored session's policy decides, not the new document's.
    hostile = SessionDoc(doc.name, command="/hijacked", predecessor=digest,
                         read=[world.bob.identity], update=[world.bob.identity])
    with world.client(world.bob) as http:
        put = http.put(f"/v1/sessions/{doc.name}", content=hostile.body())
        post = http.post("/session", content=hostile.body())
    refused(put, 403, "access_policy.update", world.bob.identity)
    refused(post, 403, "access_policy.update")
    assert_unchanged(world, doc, digest)


def test_another_identity_cannot_take_over_a_name(world: World) -> None:
    doc = SessionDoc(unique_name("taken"), command="/first")
    digest = create(world, doc)
    squatter = SessionDoc(doc.name, command="/squatter", read=["ANY"], update=["ANY"])
    with world.client(world.bob) as http:
        for response in (http.post("/v1/sessions", content=squatter.body()),
                         http.post("/session", content=squatter.body())):
            refused(response, 409, "already exists")
    assert_unchanged(world, doc, digest)


def test_anonymous_clients_are_refused(world: World) -> None:
    doc = SessionDoc(unique_name("anon"), command="/anon")
    digest = create(world, doc)
    with anonymous_http(world.server) as http:
        got = http.get(f"/v1/sessions/{doc.name}")
        put = http.put(f"/v1/sessions/{doc.name}",
                       content=SessionDoc(doc.name, predecessor=digest).body())
    assert got.status_code in (401, 403), got.text
    assert "access_policy.read" in got.json()["reason"] or \
        "client certificate" in got.json()["reason"], got.text
    assert doc.keys["encrypted-input-files"] not in got.text
    refused(put, 401, "client certificate")
    assert_unchanged(world, doc, digest)


def test_anonymous_clients_never_get_volume_keys_even_from_an_any_session(world: World) -> None:
    """``read: [ANY]`` opens a session to any *identity*, not to unauthenticated clients."""
    doc = SessionDoc(unique_name("anyread"), read=["ANY"])
    create(world, doc)
    with anonymous_http(world.server) as http:
        got = http.get(f"/v1/sessions/{doc.name}")
    for key in doc.keys.values():
        assert key not in got.text, (got.status_code, "volume key sent to an anonymous client")
    assert got.status_code in (401, 403), got.text
    assert got.json()["reason"], got.text
    assert got.json()["kind"] == KIND_OF[got.status_code], got.text


def test_read_any_lets_another_identity_read_but_not_update(world: World) -> None:
    doc = SessionDoc(unique_name("public"), command="/public", read=["ANY"])
    digest = create(world, doc)
    answer = read(world, doc.name, world.bob)
    assert answer["hash"] == digest
    assert answer["creator"] == world.alice.identity
    assert "/public" in answer["session"]
    with world.client(world.bob) as http:
        tag = http.get(f"/v1/volume-tags?session={doc.name}&volume=encrypted-input-files")
        put = http.put(f"/v1/sessions/{doc.name}",
                       content=SessionDoc(doc.name, command="/x", predecessor=digest).body())
    assert tag.status_code == 200, tag.text
    assert tag.json()["tag"] == doc.tags["encrypted-input-files"]
    refused(put, 403, "access_policy.update")
    assert_unchanged(world, doc, digest)


@pytest.mark.parametrize("listed_as", ["key hash", "certificate"])
def test_an_identity_listed_in_update_may_update(world: World, listed_as: str) -> None:
    bob = world.bob
    entry = bob.identity if listed_as == "key hash" else \
        bob.self_signed_certificate.read_text()
    doc = SessionDoc(unique_name("shared"), command="/v1", update=["CREATOR", entry])
    digest = create(world, doc)
    change = SessionDoc(doc.name, command="/v2-by-bob", predecessor=digest,
                        update=["CREATOR", entry])
    with world.client(bob) as http:
        response = http.put(f"/v1/sessions/{doc.name}", content=change.body())
    assert response.status_code == 200, response.text
    new = response.json()["hash"]
    assert new != digest
    answer = read(world, doc.name)
    assert answer["hash"] == new
    assert "/v2-by-bob" in answer["session"]
    # Ownership does not move to whoever updated it.
    assert answer["creator"] == world.alice.identity


def test_none_for_update_refuses_even_the_creator(world: World) -> None:
    doc = SessionDoc(unique_name("frozen"), command="/frozen", update=["NONE"])
    digest = create(world, doc)
    change = SessionDoc(doc.name, command="/thawed", predecessor=digest, update=["CREATOR"])
    with world.client(world.alice) as http:
        put = http.put(f"/v1/sessions/{doc.name}", content=change.body())
        post = http.post("/session", content=change.body())
    refused(put, 403, "access_policy.update", world.alice.identity)
    refused(post, 403, "access_policy.update")
    assert_unchanged(world, doc, digest)


def test_a_stale_predecessor_is_refused_and_changes_nothing(world: World) -> None:
    first = SessionDoc(unique_name("cas"), command="/rev1")
    h1 = create(world, first)
    second = SessionDoc(first.name, command="/rev2", predecessor=h1)
    with world.client(world.alice) as http:
        response = http.put(f"/v1/sessions/{first.name}", content=second.body())
        assert response.status_code == 200, response.text
        h2 = response.json()["hash"]
        late = SessionDoc(first.name, command="/rev2-lost", predecessor=h1)
        put = http.put(f"/v1/sessions/{first.name}", content=late.body())
        post = http.post("/session", content=late.body())
    refused(put, 409, "stale predecessor", h1, h2)
    refused(post, 409, "stale predecessor")
    assert_unchanged(world, second, h2)
    assert "/rev2-lost" not in read(world, first.name)["session"]


def test_the_audit_log_shows_each_refusal_with_its_reason(world: World) -> None:
    alice, bob = world.alice, world.bob
    doc = SessionDoc(unique_name("audited"))
    digest = create(world, doc)
    with world.client(bob) as http:
        assert http.get(f"/v1/sessions/{doc.name}").status_code == 403
        hostile = SessionDoc(doc.name, command="/evil", predecessor=digest)
        assert http.put(f"/v1/sessions/{doc.name}", content=hostile.body()).status_code == 403
    with world.client(alice) as http:
        stale = SessionDoc(doc.name, predecessor="0" * 64)
        assert http.put(f"/v1/sessions/{doc.name}", content=stale.body()).status_code == 409
        response = http.get(f"/v1/audit?session={doc.name}")
    assert response.status_code == 200, response.text
    events = response.json()["events"]
    assert all(event["session"] == doc.name for event in events), events

    def find(event: str, actor: str, outcome: str, fragment: str) -> dict[str, Any]:
        matches = [e for e in events if e["event"] == event and e["actor"] == actor
                   and e["outcome"] == outcome and fragment in e["reason"]]
        assert len(matches) == 1, (event, actor, outcome, fragment, events)
        return matches[0]

    created = find("session.create", alice.identity, "accepted", digest)
    read_refusal = find("session.read", bob.identity, "refused", "access_policy.read")
    update_refusal = find("session.update", bob.identity, "refused", "access_policy.update")
    stale_refusal = find("session.update", alice.identity, "refused", "stale predecessor")
    ids = [created["id"], read_refusal["id"], update_refusal["id"], stale_refusal["id"]]
    assert ids == sorted(ids), "audit events are not in the order they happened"
    assert [e["id"] for e in events] == sorted(e["id"] for e in events)
    # The log itself is protected like the session.
    with world.client(bob) as http:
        refused(http.get(f"/v1/audit?session={doc.name}"), 403, "access_policy.read")


def test_only_those_the_namespace_allows_may_create_sessions_inside_it(world: World) -> None:
    """``access_policy.create_sessions`` of ``ns`` decides who may create ``ns/…`` (SCONE)."""
    namespace = SessionDoc(unique_name("ns"))  # create_sessions defaults to CREATOR
    create(world, namespace)
    intruder = SessionDoc(f"{namespace.name}/intruder", command="/intruder")
    with world.client(world.bob) as http:
        response = http.post("/v1/sessions", content=intruder.body())
    refused(response, 403, "create_sessions")
    with world.client(world.alice) as http:
        assert http.get(f"/v1/sessions/{intruder.name}").status_code == 404
        # The namespace's owner may.
        own = SessionDoc(f"{namespace.name}/own")
        assert http.post("/v1/sessions", content=own.body()).status_code == 201


@pytest.mark.parametrize("suffix", ["audit", "volumes/encrypted-input-files"])
def test_a_session_named_like_a_sub_resource_is_readable_by_its_name(
        world: World, suffix: str) -> None:
    """Names may contain '/', so ``ns/audit`` is a session name the CAS accepts."""
    doc = SessionDoc(f"{unique_name('ns')}/{suffix}", command="/sub")
    parts = doc.name.split("/")
    for depth in range(1, len(parts)):  # a session inside a namespace needs the namespace
        create(world, SessionDoc("/".join(parts[:depth])))
    create(world, doc)
    answer = read(world, doc.name)
    assert answer["name"] == doc.name
    assert "/sub" in answer["session"]

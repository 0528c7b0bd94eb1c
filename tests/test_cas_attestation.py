"""Key release: only an attested program gets a session's configuration, each refusal names why.

Real servers on loopback: a debug CAS (``tdapp cas serve --debug``) and a LAS
(``tdapp las serve``) whose Ed25519 key signs sim evidence.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from cas_fixtures import (
    MRENCLAVE,
    CasServer,
    MakeUser,
    Postgres,
    SessionDoc,
    StartCas,
    User,
    accepts_tcp,
    anonymous_http,
    child_environment,
    free_port,
    unique_name,
)
from jwcrypto.common import JWException

from tdapp.attest import Workload, report_data
from tdapp.cas.nonces import NonceMinter
from tdapp.cas.sealing import MasterKey
from tdapp.client.cas_client import CasClient
from tdapp.client.key_release import EphemeralKey, obtain_configuration, report_tag
from tdapp.core.address import Address
from tdapp.errors import ConflictError, RefusedError

OTHER = "ab" * 32


@pytest.fixture(scope="module")
def las(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    yield from _start_las(tmp_path_factory.mktemp("las"))


@pytest.fixture(scope="module")
def other_las(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    yield from _start_las(tmp_path_factory.mktemp("las-other"))


def _start_las(root: Path) -> Iterator[str]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "tdapp", "las", "serve", "--port", str(port),
         "--state-dir", str(root / "state")],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env=child_environment(root), start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not accepts_tcp("127.0.0.1", port):
            assert process.poll() is None and time.monotonic() < deadline, "LAS did not start"
            time.sleep(0.1)
        yield f"127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=15)


def platform_of(las: str) -> str:
    answer = httpx.get(f"http://{las}/v1/platform", timeout=10)
    answer.raise_for_status()
    return str(answer.json()["platform"])


@pytest.fixture(scope="module")
def world(cas_server: StartCas, user: MakeUser, las: str) -> tuple[CasServer, User]:
    # A debug CAS trusts the LAS it is told of, for sessions that name no platform.
    server = cas_server(extra=("--debug", "--las-platform", platform_of(las)))
    alice = user("alice")
    alice.attest(server)
    return server, alice


def evidence(las: str, data: bytes, measurement: str = MRENCLAVE,
             debug: bool = False) -> dict[str, Any]:
    answer = httpx.post(f"http://{las}/v1/evidence", timeout=10, json={
        "report_data": data.hex(), "measurement": measurement, "debug": debug})
    answer.raise_for_status()
    result: dict[str, Any] = answer.json()
    return result


def create(world: tuple[CasServer, User], doc: SessionDoc, security: dict[str, Any] | None = None
           ) -> SessionDoc:
    server, alice = world
    document = doc.as_dict()
    if security is not None:
        document["security"] = security
    with alice.http(server) as http:
        response = http.post("/v1/sessions", content=json.dumps(document).encode())
    assert response.status_code == 201, response.text
    return doc


def runtime(server: CasServer) -> CasClient:
    """What a runtime has: the pinned CAS certificate and no client identity."""
    from cryptography import x509

    pinned = x509.load_pem_x509_certificate(server.cert_path.read_bytes())
    return CasClient(Address.parse(server.address), pinned, None)


def attempt(server: CasServer, session: str, evidence_body: dict[str, Any] | None,
            nonce: str, key: EphemeralKey, service: str = "application",
            workload: str = MRENCLAVE) -> httpx.Response:
    with anonymous_http(server) as http:
        return http.post("/v1/attestation", json={
            "session": session, "service": service, "nonce": nonce,
            "public_key": key.public_b64url, "workload": workload, "evidence": evidence_body})


def bind(nonce: str, key: EphemeralKey, session: str, *, service: str = "application",
         workload: str = MRENCLAVE) -> bytes:
    """The report_data a runtime of ``workload`` puts in its evidence for this attempt."""
    return report_data(nonce, key.public_der, Workload(workload, session, service))


def new_nonce(server: CasServer, session: str, service: str = "application") -> str:
    with anonymous_http(server) as http:
        answer = http.post("/v1/attestation/nonce", json={"session": session, "service": service})
    assert answer.status_code == 201, answer.text
    return str(answer.json()["nonce"])


def refused(server: CasServer, world: tuple[CasServer, User], response: httpx.Response,
            status: int, reason: str, session: str, *, told: str | None = None) -> None:
    """Refused with ``status``; the audit log has ``reason``, the anonymous caller was
    told ``told`` (the same, unless the full reason reveals what the session expects)."""
    assert response.status_code == status, response.text
    answer = response.json()
    assert answer["kind"] == {403: "refused", 404: "not_found"}[status], answer
    assert (told or reason) in answer["reason"], answer
    _, alice = world
    with alice.http(server) as http:
        events = http.get(f"/v1/audit?session={session}").json()["events"]
    assert any(e["outcome"] == "refused" and reason in e["reason"] for e in events), events
    assert "jwe" not in response.text


def test_the_right_program_gets_its_configuration_and_only_it_can_read_it(
        world: tuple[CasServer, User], las: str) -> None:
    server, _ = world
    doc = create(world, SessionDoc(unique_name("ok"), injected="[db]\npassword=s3cret\n"))
    nonce = new_nonce(server, doc.name)
    key = EphemeralKey()
    answer = attempt(server, doc.name, evidence(las, bind(nonce, key, doc.name)),
                     nonce, key)
    assert answer.status_code == 200, answer.text
    sealed = answer.json()["jwe"]
    for secret in [*doc.keys.values(), "s3cret"]:
        assert secret not in answer.text
    with pytest.raises(JWException):
        from jwcrypto import jwe, jwk

        intruder = jwk.JWK.generate(kty="EC", crv="P-256")
        jwe.JWE().deserialize(sealed, key=intruder)
    config = key.open(sealed)
    assert config.command == ("/application",)
    assert config.environment == {"SCONE_MODE": "hw"}
    assert config.pwd == "/"
    volumes = {v.name: v for v in config.volumes}
    granted = volumes["encrypted-input-files"]
    assert (granted.path, granted.key.hex(), granted.tag and granted.tag.hex()) == (
        "/encryptedInputs", doc.keys["encrypted-input-files"],
        doc.tags["encrypted-input-files"])
    assert volumes["encrypted-output-files"].path == "/encryptedOutputs"
    assert config.injection_files[0].content.get_secret_value() == b"[db]\npassword=s3cret\n"
    assert len(config.token.get_secret_value()) == 64
    # Nothing secret in its repr: keys, token, environment and injected files are hidden.
    shown = repr(config)
    for secret in [*doc.keys.values(), "s3cret", config.token.get_secret_value(), "SCONE_MODE"]:
        assert secret not in shown


def test_the_python_client_does_the_whole_exchange(world: tuple[CasServer, User],
                                                   las: str) -> None:
    server, _ = world
    doc = create(world, SessionDoc(unique_name("client")))
    released = obtain_configuration(runtime(server), Workload(MRENCLAVE, doc.name, "application"),
                                    lambda data, _mode: evidence(las, data))
    assert (released.session, released.service) == (doc.name, "application")


def _fresh(world: tuple[CasServer, User], **security: Any) -> tuple[str, str, EphemeralKey]:
    server, _ = world
    doc = create(world, SessionDoc(unique_name("r")), security or None)
    return doc.name, new_nonce(server, doc.name), EphemeralKey()


def test_wrong_measurement(world: tuple[CasServer, User], las: str) -> None:
    server, _ = world
    name, nonce, key = _fresh(world)
    body = evidence(las, bind(nonce, key, name), measurement=OTHER)
    response = attempt(server, name, body, nonce, key)
    refused(server, world, response, 403, "is not one of the session's mrenclaves", name,
            told=f"measurement {OTHER} is not one this service accepts")
    assert MRENCLAVE not in response.text  # an anonymous caller learns nothing it expects


def test_a_reader_presenting_its_certificate_is_told_the_full_reason(
        world: tuple[CasServer, User], las: str, user: MakeUser) -> None:
    """Attacks the redaction of refusals from both sides: the session's reader, posting
    its attestation with its client certificate, is told what the session expects; a
    certified identity that is not a reader is told only which check failed. What must
    not happen: a non-reader learning the session's measurements."""
    server, alice = world
    mallory = user("mallory-attest")
    mallory.attest(server)
    for who, told in ((alice, "is not one of the session's mrenclaves"),
                      (mallory, f"measurement {OTHER} is not one this service accepts")):
        name, nonce, key = _fresh(world)
        body = evidence(las, bind(nonce, key, name), measurement=OTHER)
        with who.http(server) as http:
            response = http.post("/v1/attestation", json={
                "session": name, "service": "application", "nonce": nonce,
                "public_key": key.public_b64url, "workload": MRENCLAVE, "evidence": body})
        refused(server, world, response, 403, "is not one of the session's mrenclaves", name,
                told=told)
        assert (MRENCLAVE in response.text) is (who is alice), (who.name, response.text)


def test_reused_nonce(world: tuple[CasServer, User], las: str) -> None:
    server, _ = world
    name, nonce, key = _fresh(world)
    body = evidence(las, bind(nonce, key, name))
    assert attempt(server, name, body, nonce, key).status_code == 200
    refused(server, world, attempt(server, name, body, nonce, key), 403,
            "nonce already used (replay)", name)


def _minted_by_the_cas(server: CasServer, name: str, service: str, at: float) -> str:
    """A nonce made with the CAS's own master key, as another replica would make it."""
    minter = NonceMinter(MasterKey.load_or_create(server.state_dir / "master.key"))
    return minter.issue(name, service, now=at)[0]


def test_expired_nonce(world: tuple[CasServer, User], las: str) -> None:
    server, _ = world
    name, _, key = _fresh(world)
    nonce = _minted_by_the_cas(server, name, "application", time.time() - 121)
    body = evidence(las, bind(nonce, key, name))
    refused(server, world, attempt(server, name, body, nonce, key), 403, "nonce expired", name)


@pytest.mark.parametrize("forgery", ["random", "flipped bit", "another session",
                                     "another service", "truncated"])
def test_nonce_not_issued_for_this_service(world: tuple[CasServer, User], las: str,
                                           forgery: str) -> None:
    server, _ = world
    name, nonce, key = _fresh(world)
    other, _, _ = _fresh(world)
    forged = {
        "random": "ab" * 40,
        "flipped bit": nonce[:-1] + format(int(nonce[-1], 16) ^ 1, "x"),
        "another session": new_nonce(server, other),
        "another service": _minted_by_the_cas(server, name, "other", time.time()),
        "truncated": nonce[:-2],
    }[forgery]
    body = evidence(las, bind(forged, key, name))
    refused(server, world, attempt(server, name, body, forged, key), 403, "unknown nonce", name)


def test_a_refused_attempt_spends_its_nonce(world: tuple[CasServer, User], las: str) -> None:
    server, _ = world
    name, nonce, key = _fresh(world)
    wrong = evidence(las, bind(nonce, key, name), measurement=OTHER)
    refused(server, world, attempt(server, name, wrong, nonce, key), 403,
            "is not one of the session's mrenclaves", name, told="is not one this service")
    right = evidence(las, bind(nonce, key, name))
    refused(server, world, attempt(server, name, right, nonce, key), 403,
            "nonce already used (replay)", name)


@pytest.mark.parametrize("binds", ["another nonce", "another key"])
def test_report_data_binding_another_nonce_or_key(world: tuple[CasServer, User], las: str,
                                                   binds: str) -> None:
    server, _ = world
    name, nonce, key = _fresh(world)
    data = bind("00" * 32, key, name) if binds == "another nonce" else \
        bind(nonce, EphemeralKey(), name)
    refused(server, world, attempt(server, name, evidence(las, data), nonce, key), 403,
            "report_data does not bind", name)


def test_platform_not_allowed(world: tuple[CasServer, User], las: str, other_las: str) -> None:
    server, _ = world
    allowed = httpx.get(f"http://{las}/v1/platform", timeout=10).json()["platform"]
    name, nonce, key = _fresh(world, attestation={"mode": "sim", "platforms": [allowed]})
    body = evidence(other_las, bind(nonce, key, name))
    response = attempt(server, name, body, nonce, key)
    refused(server, world, response, 403, "is not in the allowed platforms", name,
            told=f"platform {platform_of(other_las)} is not one this session names")
    assert allowed not in response.text


def test_bad_signature(world: tuple[CasServer, User], las: str) -> None:
    server, _ = world
    name, nonce, key = _fresh(world)
    body = evidence(las, bind(nonce, key, name))
    signature = bytearray(base64.b64decode(body["signature"]))
    signature[0] ^= 1
    body["signature"] = base64.b64encode(bytes(signature)).decode()
    refused(server, world, attempt(server, name, body, nonce, key), 403, "bad signature", name)


def test_sim_evidence_for_a_hardware_session(world: tuple[CasServer, User], las: str) -> None:
    server, _ = world
    name, nonce, key = _fresh(world, attestation={"mode": "hardware"})
    body = evidence(las, bind(nonce, key, name))
    refused(server, world, attempt(server, name, body, nonce, key), 403,
            "sim evidence is not accepted", name)


def test_debug_evidence_needs_the_toleration(world: tuple[CasServer, User], las: str) -> None:
    server, _ = world
    name, nonce, key = _fresh(world)
    body = evidence(las, bind(nonce, key, name), debug=True)
    refused(server, world, attempt(server, name, body, nonce, key), 403, "debug-mode", name)
    name, nonce, key = _fresh(world, attestation={"mode": "sim", "tolerate": ["debug-mode"]})
    body = evidence(las, bind(nonce, key, name), debug=True)
    assert attempt(server, name, body, nonce, key).status_code == 200


def test_a_service_the_session_does_not_have(world: tuple[CasServer, User]) -> None:
    server, _ = world
    name, _, _ = _fresh(world)
    with anonymous_http(server) as http:
        answer = http.post("/v1/attestation/nonce", json={"session": name, "service": "shell"})
    refused(server, world, answer, 404, "has no service 'shell'", name)


def _attested(world: tuple[CasServer, User], las: str, doc: SessionDoc) -> str:
    server, _ = world
    released = obtain_configuration(runtime(server), Workload(MRENCLAVE, doc.name, "application"),
                                    lambda data, _mode: evidence(las, data))
    return released.token.get_secret_value()


def test_tag_updates_only_from_this_sessions_instance_and_only_from_the_current_tag(
        world: tuple[CasServer, User], las: str) -> None:
    server, alice = world
    mine = create(world, SessionDoc(unique_name("tags")))
    theirs = create(world, SessionDoc(unique_name("theirs")))
    token = _attested(world, las, mine)
    foreign = _attested(world, las, theirs)
    old = mine.tags["encrypted-output-files"]
    client = runtime(server)
    with pytest.raises(RefusedError, match="another session"):
        report_tag(client, foreign, mine.name, "encrypted-output-files", old, "11" * 16)
    with pytest.raises(RefusedError, match="not one of an attested instance"):
        report_tag(client, "00" * 32, mine.name, "encrypted-output-files", old, "11" * 16)
    report_tag(client, token, mine.name, "encrypted-output-files", old, "22" * 16)
    with pytest.raises(ConflictError, match="no longer current"):
        report_tag(client, token, mine.name, "encrypted-output-files", old, "33" * 16)
    with alice.http(server) as http:
        tag = http.get(f"/v1/volume-tags?session={mine.name}&volume=encrypted-output-files")
    assert tag.json()["tag"] == "22" * 16


def test_two_instances_racing_for_one_tag_exactly_one_wins(world: tuple[CasServer, User],
                                                           las: str) -> None:
    server, alice = world
    doc = create(world, SessionDoc(unique_name("race")))
    tokens = [_attested(world, las, doc) for _ in range(2)]
    old = doc.tags["encrypted-output-files"]
    outcomes: list[str] = []
    barrier = threading.Barrier(len(tokens))

    def run(token: str, new: str) -> None:
        barrier.wait()
        try:
            report_tag(runtime(server), token, doc.name, "encrypted-output-files", old, new)
            outcomes.append(new)
        except ConflictError:
            outcomes.append("conflict")

    threads = [threading.Thread(target=run, args=(t, f"{i:02x}" * 16))
               for i, t in enumerate(tokens, start=1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [o for o in outcomes if o != "conflict"]
    assert len(winners) == 1 and outcomes.count("conflict") == 1
    with alice.http(server) as http:
        tag = http.get(f"/v1/volume-tags?session={doc.name}&volume=encrypted-output-files")
    assert tag.json()["tag"] == winners[0]


def test_mode_none_releases_without_evidence_and_says_so_in_the_audit_log(
        world: tuple[CasServer, User]) -> None:
    server, alice = world
    name, nonce, key = _fresh(world, attestation={"mode": "none"})
    answer = attempt(server, name, None, nonce, key)
    assert answer.status_code == 200, answer.text
    assert key.open(answer.json()["jwe"]).mode == "none"
    with alice.http(server) as http:
        events = http.get(f"/v1/audit?session={name}").json()["events"]
    assert any("accepted none attestation" in e["reason"] for e in events)
    assert any("UnsafeNoOp" in e["reason"] for e in events)  # the policy that decided


def test_hardware_and_sim_sessions_need_evidence(world: tuple[CasServer, User]) -> None:
    server, _ = world
    name, nonce, key = _fresh(world)
    refused(server, world, attempt(server, name, None, nonce, key), 403,
            "evidence is required", name)


def test_one_nonce_is_spent_once_across_two_replicas(cas_server: StartCas, user: MakeUser,
                                                     postgres: Postgres, las: str) -> None:
    url = postgres.create_database()
    trusted = ("--debug", "--las-platform", platform_of(las))
    first = cas_server(db=url, extra=trusted)
    second = cas_server(db=url, state_dir=first.state_dir, extra=trusted)
    try:
        alice = user("alice-nonce-replicas")
        alice.attest(first)
        doc = create((first, alice), SessionDoc(unique_name("replica-nonce")))
        nonce = new_nonce(first, doc.name)  # issued by one replica...
        key = EphemeralKey()
        body = evidence(las, bind(nonce, key, doc.name))
        barrier = threading.Barrier(8)

        def spend(index: int) -> httpx.Response:
            server = (first, second)[index % 2]  # ...spent at both at once
            with anonymous_http(server) as http:
                assert http.get("/v1/health").status_code == 200
                barrier.wait(timeout=30)
                return http.post("/v1/attestation", json={
                    "session": doc.name, "service": "application", "nonce": nonce,
                    "public_key": key.public_b64url, "workload": MRENCLAVE, "evidence": body})

        with ThreadPoolExecutor(max_workers=8) as pool:
            answers = list(pool.map(spend, range(8)))
        codes = sorted(answer.status_code for answer in answers)
        assert codes == [200] + [403] * 7, [answer.text for answer in answers]
        assert all(answer.json()["kind"] == "refused"
                   and "nonce already used (replay)" in answer.json()["reason"]
                   for answer in answers if answer.status_code == 403)
    finally:
        second.stop()
        first.stop()

"""Sim evidence is trusted only from the LAS platforms a session names, in the mode fixed
when the session was stored.

The attacker is anonymous (no client certificate, as any runtime), or holds a
certified identity that is not a reader of the session. It signs well-formed
sim evidence with an Ed25519 key of its own, replays evidence from another real
LAS, submits a sim session that names no platform, reads refusals for what the
session expects, and counts on a CAS restarted with ``--debug`` to loosen a
session stored before. Real servers on loopback: LASes, a production CAS and a debug CAS
(``--debug --las-platform``). Effects that must not happen: a configuration
(JWE) released, a volume tag moved with a released token, a session stored
without the platforms it trusts, a stored session's mode changed by a CAS flag,
and a refusal telling a non-reader the session's measurement, platforms, keys
or tags.
"""

from __future__ import annotations

import base64
import json
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import test_cas_attestation as attestation_tests
import yaml
from cas_fixtures import (
    MRENCLAVE,
    CasServer,
    MakeUser,
    SessionDoc,
    StartCas,
    User,
    anonymous_http,
    fspf_variables,
    unique_name,
)
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from test_cas_attestation import (
    attempt,
    bind,
    create,
    evidence,
    new_nonce,
    platform_of,
    refused,
    runtime,
)

from tdapp.attest import Workload
from tdapp.attest.sim import SimPlatform, platform_id
from tdapp.client.key_release import EphemeralKey, obtain_configuration, report_tag
from tdapp.core.canonical import canonical_json
from tdapp.errors import RefusedError
from tdapp.policy import fill_template, template_variables

INPUT, OUTPUT = "encrypted-input-files", "encrypted-output-files"
WRONG = "ab" * 32
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "copy_dapp"
World = tuple[CasServer, User]

# pytest finds fixtures by name in this module: test_cas_attestation's LASes and debug CAS.
las, other_las, world = attestation_tests.las, attestation_tests.other_las, attestation_tests.world


@pytest.fixture(scope="module")
def production(cas_server: StartCas, user: MakeUser) -> World:
    """A CAS without --debug: new sessions that name no mode are hardware."""
    server = cas_server()
    carol = user("carol")
    carol.attest(server)
    return server, carol


@dataclass(frozen=True)
class Target:
    """A sim session trusting only the ``las`` fixture's platform, and its owner."""

    world: World
    name: str

    @property
    def server(self) -> CasServer:
        return self.world[0]


@pytest.fixture(params=["named on a production CAS", "filled in by the debug CAS"])
def target(request: pytest.FixtureRequest, las: str) -> Target:
    """The sim session under attack: its platforms named in it, or filled in by a CAS."""
    if request.param == "named on a production CAS":
        chosen: World = request.getfixturevalue("production")
        security: dict[str, Any] | None = {
            "attestation": {"mode": "sim", "platforms": [platform_of(las)]}}
    else:
        chosen, security = request.getfixturevalue("world"), None
    doc = create(chosen, SessionDoc(unique_name("simtrust")), security)
    attestation = stored(chosen, doc.name)["security"]["attestation"]
    assert attestation == {"mode": "sim", "platforms": [platform_of(las)]}, attestation
    return Target(chosen, doc.name)


def stored(world: World, name: str) -> dict[str, Any]:
    """The session as its owner reads it back (GET /v1/sessions/NAME)."""
    server, owner = world
    with owner.http(server) as http:
        answer = http.get(f"/v1/sessions/{name}")
    assert answer.status_code == 200, answer.text
    document: dict[str, Any] = yaml.safe_load(answer.json()["session"])
    return document


def reason_of(answer: httpx.Response) -> str:
    """The reason of an error answer (``{"kind", "reason"}``)."""
    return str(answer.json()["reason"])


def tags(world: World, name: str) -> dict[str, str | None]:
    server, owner = world
    found: dict[str, str | None] = {}
    with owner.http(server) as http:
        for volume in (INPUT, OUTPUT):
            answer = http.get("/v1/volume-tags", params={"session": name, "volume": volume})
            assert answer.status_code == 200, answer.text
            found[volume] = answer.json()["tag"]
    return found


def use_it(target: Target, body: dict[str, Any], nonce: str,
           key: EphemeralKey) -> httpx.Response:
    """Send the evidence; with a configuration in hand, do what an attacker is after:
    move the output volume's tag (a rollback or a fork of the DApp's results)."""
    answer = attempt(target.server, target.name, body, nonce, key)
    if answer.status_code == 200:
        config = key.open(answer.json()["jwe"])
        report_tag(runtime(target.server), config.token.get_secret_value(), target.name,
                   OUTPUT, tags(target.world, target.name)[OUTPUT], secrets.token_hex(16))
    return answer


def signed(key: Ed25519PrivateKey, body: dict[str, Any], public_key: bytes) -> dict[str, Any]:
    """Sim evidence in tdapp.attest.sim's wire format, with any body and public key."""
    text = canonical_json(body)

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()

    return {"tee": "sim", "body": b64(text), "public_key": b64(public_key),
            "signature": b64(key.sign(text))}


@pytest.mark.parametrize("forgery", ["own platform", "claims the LAS's platform id",
                                     "presents the LAS's public key"])
def test_sim_evidence_signed_with_the_attackers_own_key_releases_nothing(
        target: Target, las: str, tmp_path: Path, forgery: str) -> None:
    """An anonymous caller signs evidence for the exact measurement and binding with its
    own Ed25519 key: no configuration, so no token, so the output tag stays put."""
    before = tags(target.world, target.name)
    attacker = SimPlatform.load_or_create(tmp_path / "attacker")
    nonce, key = new_nonce(target.server, target.name), EphemeralKey()
    data = bind(nonce, key, target.name)  # the exact binding the CAS will check
    if forgery == "own platform":
        body = attacker.evidence(measurement=MRENCLAVE, report_data=data, debug=False,
                                 issued_at=time.time())
    else:
        genuine = evidence(las, data)
        las_key = base64.b64decode(genuine["public_key"])
        assert platform_id(las_key) == platform_of(las)
        claimed = {"measurement": MRENCLAVE, "report_data": data.hex(),
                   "platform": platform_of(las), "debug": False, "issued_at": time.time()}
        shown = attacker.raw_public_key if forgery.startswith("claims") else las_key
        body = signed(attacker.key, claimed, shown)
    answer = use_it(target, body, nonce, key)
    assert answer.status_code == 403, answer.text
    assert "jwe" not in answer.json(), answer.text
    assert tags(target.world, target.name) == before
    if forgery == "own platform":
        refused(target.server, target.world, answer, 403, "is not in the allowed platforms",
                target.name, told=f"platform {attacker.platform} is not one this session names")
    else:  # the verifier's refusals are about the caller's own evidence: told as logged
        refused(target.server, target.world, answer, 403, "bad signature" if forgery.startswith(
            "presents") else "but its signing key is", target.name)


def test_evidence_from_another_real_las_releases_nothing(target: Target, las: str,
                                                         other_las: str) -> None:
    """Genuine evidence from a LAS the session does not name: nothing released, the
    tags stay, and the refusal does not show the platform the session trusts."""
    before = tags(target.world, target.name)
    nonce, key = new_nonce(target.server, target.name), EphemeralKey()
    answer = use_it(target, evidence(other_las, bind(nonce, key, target.name)), nonce, key)
    refused(target.server, target.world, answer, 403, "is not in the allowed platforms",
            target.name, told=f"platform {platform_of(other_las)} is not one this session names")
    assert platform_of(las) not in answer.text
    assert tags(target.world, target.name) == before
    # The control: the LAS the session names is trusted, so the refusal was the platform's.
    released = obtain_configuration(
        runtime(target.server), Workload(MRENCLAVE, target.name, "application"),
        lambda data, _mode: evidence(las, data))
    assert released.session == target.name


# -- what a refusal tells whom -------------------------------------------------------------


def _bad_evidence(world: World, las: str, other_las: str, check: str
                  ) -> tuple[SessionDoc, dict[str, Any], str, EphemeralKey]:
    server, _ = world
    doc = create(world, SessionDoc(unique_name("redact")))
    nonce, key = new_nonce(server, doc.name), EphemeralKey()
    data = bind(nonce, key, doc.name)
    body = {"measurement": evidence(las, data, measurement=WRONG),
            "platform": evidence(other_las, data),
            "debug": evidence(las, data, debug=True)}[check]
    return doc, body, nonce, key


FULL = {"measurement": f"is not one of the session's mrenclaves (expected one of {MRENCLAVE})",
        "platform": "is not in the allowed platforms",
        "debug": "debug-mode evidence needs tolerate: [debug-mode]"}


@pytest.mark.parametrize("check", ["measurement", "platform", "debug"])
def test_a_refused_non_reader_learns_nothing_the_session_holds(
        world: World, user: MakeUser, las: str, other_las: str, check: str) -> None:
    """A refused anonymous caller, and a certified one that is not a reader, are told
    which check failed, never the measurement, platform, keys or tags the session
    holds; the audit log keeps the full reason for the owner."""
    server, _ = world
    bob = user(f"bob-{check}")  # certified by this CAS, but not in the session's read list
    bob.attest(server)
    for caller in ("anonymous", "certified non-reader"):
        doc, body, nonce, key = _bad_evidence(world, las, other_las, check)
        request = {"session": doc.name, "service": "application", "nonce": nonce,
                   "public_key": key.public_b64url, "workload": MRENCLAVE, "evidence": body}
        client = anonymous_http(server) if caller == "anonymous" else bob.http(server)
        with client as http:
            answer = http.post("/v1/attestation", json=request)
        refused(server, world, answer, 403, FULL[check], doc.name, told="attestation refused")
        for held in (MRENCLAVE, platform_of(las), *doc.keys.values(), *doc.tags.values()):
            assert held not in answer.text, (caller, answer.text)
        assert "audit log" in reason_of(answer)


def test_the_sessions_owner_is_told_the_full_reason(world: World, las: str,
                                                    other_las: str) -> None:
    """The session's owner, posting with its client certificate, is told the full
    reason (its own session: nothing to hide), and still gets no configuration."""
    server, alice = world
    doc, body, nonce, key = _bad_evidence(world, las, other_las, "measurement")
    with alice.http(server) as http:
        answer = http.post("/v1/attestation", json={
            "session": doc.name, "service": "application", "nonce": nonce,
            "public_key": key.public_b64url, "workload": MRENCLAVE, "evidence": body})
    assert answer.status_code == 403 and "jwe" not in answer.json(), answer.text
    assert FULL["measurement"] in reason_of(answer), answer.text


# -- the mode is the one the session was stored with ---------------------------------------


def test_a_debug_restart_does_not_loosen_a_stored_hardware_session(
        cas_server: StartCas, user: MakeUser, las: str) -> None:
    """An operator restarts a production CAS on the same state with --debug and a trusted
    LAS: the hardware session it stored stays hardware and sim evidence gets nothing."""
    first = cas_server()
    dave = user("dave")
    dave.attest(first)
    doc = create((first, dave), SessionDoc(unique_name("fixed")))
    hashed = stored((first, dave), doc.name)
    assert hashed["security"]["attestation"] == {"mode": "hardware"}
    first.stop()
    # The same state (certificate, master key, SQLite database) and port, now debug.
    loose = cas_server(state_dir=first.state_dir, port=first.port,
                       extra=("--debug", "--las-platform", platform_of(las)))
    world = (loose, dave)
    shown = dave.tdapp("session", "read", doc.name, "--cas", loose.address)
    assert shown.code == 0, shown.err
    assert yaml.safe_load(shown.out)["security"]["attestation"]["mode"] == "hardware"
    nonce, key = new_nonce(loose, doc.name), EphemeralKey()
    answer = attempt(loose, doc.name, evidence(las, bind(nonce, key, doc.name)),
                     nonce, key)
    refused(loose, world, answer, 403, "sim evidence is not accepted", doc.name)
    assert stored(world, doc.name) == hashed
    # The control: a session created now gets the debug CAS's sim, and that LAS will do.
    fresh = create(world, SessionDoc(unique_name("fresh")))
    released = obtain_configuration(runtime(loose), Workload(MRENCLAVE, fresh.name, "application"),
                                    lambda data, _mode: evidence(las, data))
    assert released.mode == "sim"


def test_sim_without_platforms_is_not_stored_on_a_production_cas(production: World) -> None:
    """A sim session naming no platform would trust any LAS key: it is not stored."""
    server, carol = production
    content = SessionDoc(unique_name("noplat")).as_dict()
    content["security"] = {"attestation": {"mode": "sim"}}
    with carol.http(server) as http:
        answer = http.post("/v1/sessions", content=json.dumps(content).encode())
        assert answer.status_code == 400, answer.text
        assert "security.attestation.platforms" in reason_of(answer), answer.text
        assert http.get(f"/v1/sessions/{content['name']}").status_code == 404


def test_a_hardware_session_refuses_the_trusted_las_even_on_a_debug_cas(
        world: World, las: str) -> None:
    """Even a debug CAS that trusts this LAS releases nothing of a hardware session to
    its sim evidence; the session and its tags stay as stored."""
    server, _ = world
    doc = create(world, SessionDoc(unique_name("hw")), {"attestation": {"mode": "hardware"}})
    before = tags(world, doc.name)
    with pytest.raises(RefusedError, match="sim evidence is not accepted"):
        obtain_configuration(runtime(server), Workload(MRENCLAVE, doc.name, "application"),
                             lambda data, _mode: evidence(las, data))
    assert tags(world, doc.name) == before
    assert stored(world, doc.name)["security"]["attestation"] == {"mode": "hardware"}


@pytest.mark.parametrize("attestation", [
    {"mode": "maa"},  # refused by the language: no url
    {"mode": "maa", "url": "https://attest.example.net", "tolerate": ["maa-managed-tcb"]},
], ids=["bare", "complete"])
def test_mode_maa_is_not_stored(world: World, attestation: dict[str, Any]) -> None:
    """A mode tdapp cannot enforce is not stored (it would be judged by nothing)."""
    server, alice = world
    content = SessionDoc(unique_name("maa")).as_dict()
    content["security"] = {"attestation": attestation}
    with alice.http(server) as http:
        answer = http.post("/v1/sessions", content=json.dumps(content).encode())
        assert answer.status_code == 400, answer.text
        assert "security.attestation.mode" in reason_of(answer), answer.text
        assert http.get(f"/v1/sessions/{content['name']}").status_code == 404


# -- the template a build writes -----------------------------------------------------------


def test_a_built_template_trusts_only_the_las_it_found(
        production: World, user: MakeUser, las: str, other_las: str, tmp_path: Path) -> None:
    """The template a build writes with a LAS at hand trusts that LAS alone: created on a
    production CAS, another LAS's evidence gets nothing, the builder's LAS gets it."""
    server, carol = production
    builder = user("builder")
    app = shutil.copytree(EXAMPLE, tmp_path / "app", ignore=shutil.ignore_patterns("copy_files"))
    template = tmp_path / "copy_dapp.yml"
    built = builder.tdapp("build", app, "--name", "copy_demo", "-o", template,
                          env={"TDAPP_LAS": las})
    assert built.code == 0, built.err
    measurement = built.out.strip()
    text = template.read_text()
    assert f"platforms: [{platform_of(las)}]" in text and "mode: sim" in text
    assert "LAS_PLATFORM" not in template_variables(text)
    name = unique_name("built")
    filled = fill_template(text, {"SESSION": name, **fspf_variables()})
    with carol.http(server) as http:
        created = http.post("/v1/sessions", content=filled.encode())
    assert created.status_code == 201, created.text
    assert stored(production, name)["security"]["attestation"] == {
        "mode": "sim", "platforms": [platform_of(las)]}
    with pytest.raises(RefusedError, match=f"platform {platform_of(other_las)} is not one"):
        obtain_configuration(runtime(server), Workload(measurement, name, "application"),
                             lambda data, _mode: evidence(other_las, data, measurement))
    released = obtain_configuration(runtime(server), Workload(measurement, name, "application"),
                                    lambda data, _mode: evidence(las, data, measurement))
    assert released.session == name

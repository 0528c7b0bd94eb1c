"""A CAS in hardware mode fed a real SGX quote (../shared/testdata/dcap).

The CAS verifies as of the sample's time (``--verify-at``) with the sample's
collateral (``--collateral``). The quote's report_data is "Hello, world!", not
this run's nonce and key, so even a session that accepts everything about the
enclave and its platform must refuse it, after every other check has passed,
each step in the audit log.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
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

from tdapp.client.key_release import EphemeralKey

DCAP = Path(__file__).resolve().parents[2] / "shared" / "testdata" / "dcap"
SGX_AT = 1750334171
SGX_MRENCLAVE = "33d8736db756ed4997e04ba358d27833188f1932ff7b1d156904d3f560452fbb"
pytestmark = pytest.mark.skipif(not DCAP.is_dir(), reason="../shared/testdata/dcap is missing")


@pytest.fixture(scope="module")
def world(cas_server: StartCas, user: MakeUser) -> tuple[CasServer, User]:
    server = cas_server(extra=("--verify-at", str(SGX_AT), "--collateral",
                               str(DCAP / "sgx_quote_collateral.json")))
    alice = user("alice-hardware")
    alice.attest(server)
    return server, alice


def create(world: tuple[CasServer, User], attestation: dict[str, Any]) -> str:
    server, alice = world
    document = SessionDoc(unique_name("hw")).as_dict()
    document["services"][0]["mrenclaves"] = [SGX_MRENCLAVE]
    document["security"] = {"attestation": attestation}
    with alice.http(server) as http:
        response = http.post("/v1/sessions", content=json.dumps(document).encode())
    assert response.status_code == 201, response.text
    return str(document["name"])


def attest_with_the_sample(server: CasServer, session: str) -> httpx.Response:
    with anonymous_http(server) as http:
        nonce = http.post("/v1/attestation/nonce",
                          json={"session": session, "service": "application"}).json()["nonce"]
        quote = base64.b64encode((DCAP / "sgx_quote").read_bytes()).decode()
        return http.post("/v1/attestation", json={
            "session": session, "service": "application", "nonce": nonce,
            "public_key": EphemeralKey().public_b64url, "workload": "00" * 32,
            "evidence": {"tee": "sgx", "quote": quote}})


def audit(world: tuple[CasServer, User], session: str) -> list[tuple[str, str, str]]:
    server, alice = world
    with alice.http(server) as http:
        events = http.get(f"/v1/audit?session={session}").json()["events"]
    return [(event["event"], event["outcome"], event["reason"]) for event in events
            if event["event"].startswith("attest")]


TOLERANT = {"mode": "hardware", "tolerate": ["software-hardening-needed", "hyperthreading"],
            "ignore_advisories": ["INTEL-SA-00289", "INTEL-SA-00615"]}


def test_the_sgx_sample_passes_signature_and_tcb_and_is_refused_for_its_binding(
        world: tuple[CasServer, User]) -> None:
    server, _ = world
    session = create(world, TOLERANT)
    answer = attest_with_the_sample(server, session)
    assert answer.status_code == 403, answer.text
    assert answer.json()["kind"] == "refused"
    assert "report_data does not bind this nonce and key" in answer.json()["reason"]
    assert "jwe" not in answer.text
    steps = audit(world, session)
    assert [(event, outcome) for event, outcome, _ in steps] == [
        ("attest.evidence", "accepted"), ("attest.tee", "accepted"),
        ("attest.measurement", "accepted"), ("attest.debug", "accepted"),
        ("attest.tcb", "accepted"), ("attest", "refused")]
    evidence = steps[0][2]
    assert "sgx evidence verified" in evidence and SGX_MRENCLAVE in evidence
    assert "TCB ConfigurationAndSWHardeningNeeded" in evidence
    assert "INTEL-SA-00289, INTEL-SA-00615" in evidence
    assert "report_data does not bind" in steps[-1][2]


@pytest.mark.parametrize(("attestation", "reason"), [
    ({"mode": "hardware", "ignore_advisories": ["INTEL-SA-00289", "INTEL-SA-00615"]},
     "TCB status ConfigurationAndSWHardeningNeeded needs tolerate: [software-hardening-needed, "
     "hyperthreading (or insecure-configuration)]"),
    ({"mode": "hardware", "tolerate": ["software-hardening-needed", "hyperthreading"]},
     "advisories INTEL-SA-00289, INTEL-SA-00615 are not in ignore_advisories"),
    ({"mode": "hardware", "tolerate": ["software-hardening-needed", "hyperthreading"],
      "ignore_advisories": ["INTEL-SA-00289"]},
     "advisory INTEL-SA-00615 is not in ignore_advisories"),
])
def test_without_the_tolerations_the_tcb_is_refused(world: tuple[CasServer, User],
                                                    attestation: dict[str, Any],
                                                    reason: str) -> None:
    server, _ = world
    session = create(world, attestation)
    answer = attest_with_the_sample(server, session)
    # The anonymous runtime is told which check failed; the audit log says why.
    told = answer.json()["reason"]
    assert answer.status_code == 403 and answer.json()["kind"] == "refused", answer.text
    assert "TCB status" in told, answer.text
    assert "is not tolerated by this session" in told and "tolerate:" not in told
    assert audit(world, session)[-1] == ("attest", "refused", reason)


def test_a_wrong_mrenclave_is_refused_before_the_tcb(world: tuple[CasServer, User]) -> None:
    server, alice = world
    document = SessionDoc(unique_name("hw")).as_dict()  # the fixture's own mrenclave
    document["security"] = {"attestation": TOLERANT}
    with alice.http(server) as http:
        assert http.post("/v1/sessions",
                         content=json.dumps(document).encode()).status_code == 201
    answer = attest_with_the_sample(server, str(document["name"]))
    assert answer.status_code == 403 and answer.json()["kind"] == "refused", answer.text
    told = answer.json()["reason"]
    assert f"measurement {SGX_MRENCLAVE} is not one this service accepts" in told
    assert f"measurement {SGX_MRENCLAVE} is not one of the session's mrenclaves" in \
        audit(world, str(document["name"]))[-1][2]

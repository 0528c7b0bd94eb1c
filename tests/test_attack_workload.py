"""Attest the DApp, not only the machine: the workload bound in the evidence decides.

The attacker runs code the session did not name on a platform the session
trusts: another image in an accepted confidential VM, the accepted image in
another VM, a sim runtime that tells the LAS one measurement and binds
another, or a host that swaps the image's files between the measurement and
the run; and a CAS that releases a configuration meant for another image.
Effects that must not happen: a configuration released, a session stored
whose VM variant pins no program, a swapped file run, another image's
configuration used.

Hardware CVM evidence cannot be made here (its signature covers report_data),
so the VM cases judge verified claims with the CAS's own checks
(:func:`tdapp.cas.judging.checks_for`), exactly as the CAS does after a
verifier accepted the quote; sim cases go through a real CAS and LAS.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import MappingProxyType

import pytest
from cas_fixtures import MRENCLAVE, CasServer, SessionDoc, User, unique_name
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

from tdapp.attest import Claims, Tee, Workload, report_data
from tdapp.builder import hold_image, measure_image
from tdapp.cas.judging import checks_for, public_reason
from tdapp.client.key_release import EphemeralKey
from tdapp.errors import IntegrityError
from tdapp.policy import SessionError, parse_session
from tdapp.policy.security import AttestationMode

MRTD, OTHER_MRTD = "9a" * 48, "9b" * 48
NONCE, KEY = "00" * 32, b"ephemeral key"


def cvm_session(variant: str) -> str:
    return f"""
name: cvm
version: "0.3"
security: {{attestation: {{mode: hardware}}}}
services:
  - name: app
    attestation: [{variant}]
    command: /app
"""


PINNED = cvm_session(f"{{tdx: {{mrtd: [{MRTD}]}}, mrenclave: [{MRENCLAVE}]}}")


def tdx_claims(mrtd: str, workload: Workload) -> Claims:
    return Claims(tee=Tee.TDX, measurement=mrtd, report_data=report_data(NONCE, KEY, workload),
                  platform="pp" * 8, debug=False, tcb_status="UpToDate",
                  values=MappingProxyType({"mrtd": mrtd}))


def judged(text: str, mrtd: str, runs: str, claims_workload: str | None = None) -> str | None:
    """The full reason the CAS's checks refuse with (None: released)."""
    session = parse_session(text)
    service = session.service("app")
    assert service is not None
    workload = Workload(runs, session.name, "app")
    # The evidence binds ``claims_workload`` (a liar) or what the request names.
    bound = Workload(claims_workload or runs, session.name, "app")
    claims = tdx_claims(mrtd, bound)
    for label, policy in checks_for(session, service, AttestationMode.HARDWARE, NONCE, KEY,
                                    workload, claims.tee):
        verdict = policy.verify(claims)
        if not verdict.ok:
            told = public_reason(label, claims, verdict.reason, runs)
            assert MRENCLAVE not in told or runs == MRENCLAVE  # never what the session wants
            return f"{label}: {verdict.reason}"
    return None


def test_the_accepted_workload_in_the_accepted_vm_is_released() -> None:
    assert judged(PINNED, MRTD, MRENCLAVE) is None


def test_another_image_in_the_same_vm_is_refused_naming_the_workload() -> None:
    reason = judged(PINNED, MRTD, OTHER)
    assert reason is not None and reason.startswith("measurement: ")
    assert f"workload {OTHER} is not one of the variant's mrenclaves" in reason


def test_the_same_image_in_another_vm_is_refused() -> None:
    reason = judged(PINNED, OTHER_MRTD, MRENCLAVE)
    assert reason is not None and "mrtd" in reason


def test_naming_one_workload_while_the_evidence_binds_another_is_refused() -> None:
    # The request says the accepted image; the quote's report_data binds another one.
    reason = judged(PINNED, MRTD, MRENCLAVE, claims_workload=OTHER)
    assert reason is not None and reason.startswith("report_data: ")


def test_a_vm_variant_without_a_workload_is_refused_at_creation() -> None:
    with pytest.raises(SessionError, match="pins the VM, not the program in it"):
        parse_session(cvm_session(f"{{tdx: {{mrtd: [{MRTD}]}}}}"))
    with pytest.raises(SessionError, match="pins the VM, not the program"):
        parse_session(cvm_session(f"{{snp: {{measurement: [{'ab' * 48}]}}}}"))
    # Saying so in a name that reads as unsafe is the only way, and then any image runs.
    loose = cvm_session(f"{{tdx: {{mrtd: [{MRTD}]}}, unsafe_any_workload: true}}")
    assert judged(loose, MRTD, OTHER) is None
    with pytest.raises(SessionError, match="unsafe_any_workload applies only"):
        parse_session(cvm_session(f"{{mrenclave: [{MRENCLAVE}], unsafe_any_workload: true}}"))


# -- sim, through a real CAS and LAS -----------------------------------------------------


def test_sim_evidence_for_one_measurement_binding_another_workload_releases_nothing(
        world: tuple[CasServer, User], las: str) -> None:  # noqa: F811 - fixtures
    server, alice = world
    doc = SessionDoc(unique_name("workload"))
    with alice.http(server) as http:
        assert http.post("/v1/sessions", content=json.dumps(doc.as_dict()).encode()
                         ).status_code == 201
    nonce, key = new_nonce(server, doc.name), EphemeralKey()
    # The LAS signs the accepted measurement; the runtime binds and names another image.
    body = evidence(las, bind(nonce, key, doc.name, workload=OTHER), measurement=MRENCLAVE)
    response = attempt(server, doc.name, body, nonce, key, workload=OTHER)
    refused(server, world, response, 403, f"binds workload {OTHER} but measures {MRENCLAVE}",
            doc.name)


def test_sim_evidence_naming_a_workload_it_does_not_bind_releases_nothing(
        world: tuple[CasServer, User], las: str) -> None:  # noqa: F811 - fixtures
    server, alice = world
    doc = SessionDoc(unique_name("workload"))
    with alice.http(server) as http:
        assert http.post("/v1/sessions", content=doc.body()).status_code == 201
    nonce, key = new_nonce(server, doc.name), EphemeralKey()
    body = evidence(las, bind(nonce, key, doc.name, workload=OTHER), measurement=MRENCLAVE)
    response = attempt(server, doc.name, body, nonce, key, workload=MRENCLAVE)
    refused(server, world, response, 403, "report_data does not bind", doc.name)


def test_a_workload_that_is_not_a_measurement_is_refused(
        world: tuple[CasServer, User]) -> None:  # noqa: F811 - fixture
    server, alice = world
    doc = SessionDoc(unique_name("workload"))
    with alice.http(server) as http:
        assert http.post("/v1/sessions", content=doc.body()).status_code == 201
    nonce, key = new_nonce(server, doc.name), EphemeralKey()
    answer = attempt(server, doc.name, None, nonce, key, workload=MRENCLAVE.upper())
    assert answer.status_code == 400 and answer.json()["kind"] == "input"


# -- the runtime runs what it measured ---------------------------------------------------


def test_files_swapped_after_the_measurement_are_not_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tdapp.builder import BuildOptions, build_image

    monkeypatch.setenv("TDAPP_HOME", str(tmp_path / "home"))
    app = tmp_path / "app"
    app.mkdir()
    (app / "run.sh").write_text("#!/bin/sh\necho honest\n")
    (app / "run.sh").chmod(0o755)
    image = build_image(app, BuildOptions(name="swap", entrypoint="/run.sh"))
    held, measured = hold_image("swap", tmp_path / "run" / "image")
    assert measured == image.measurement == measure_image(held.path)
    # The host swaps the store's file after the check: the held copy is unchanged.
    (image.path / "rootfs" / "run.sh").write_text("#!/bin/sh\necho evil\n")
    assert (held.root / "run.sh").read_text() == "#!/bin/sh\necho honest\n"
    assert measure_image(held.path) == measured
    # And a store that no longer gives its recorded measurement is not held at all.
    with pytest.raises(IntegrityError):
        hold_image("swap", tmp_path / "run2" / "image")


class _CasReleasingAnotherWorkload:
    """A CAS that answers every attestation with a configuration for another image."""

    def request_json(self, method: str, path: str, body: dict[str, object],
                     **_: object) -> dict[str, object]:
        import base64

        from cryptography.hazmat.primitives.serialization import load_der_public_key
        from pydantic import SecretStr

        from tdapp.attest.release import ReleasedConfiguration
        from tdapp.cas.attestation import _encrypt_to

        if path.endswith("/nonce"):
            return {"nonce": "ab" * 40, "mode": "sim"}
        raw = str(body["public_key"])
        key = load_der_public_key(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
        released = ReleasedConfiguration(
            session=str(body["session"]), service=str(body["service"]), mode="sim",
            workload=OTHER, command=("/evil",), environment={}, pwd="/", volumes=(),
            injection_files=(), token=SecretStr("t"), expires_at=0)
        return {"jwe": _encrypt_to(key, released)}  # type: ignore[arg-type]


def test_a_configuration_released_for_another_workload_is_not_used() -> None:
    from tdapp.client.key_release import obtain_configuration

    with pytest.raises(IntegrityError, match=f"for workload {OTHER}, not for {MRENCLAVE}"):
        obtain_configuration(_CasReleasingAnotherWorkload(),  # type: ignore[arg-type]
                             Workload(MRENCLAVE, "s", "app"), lambda _data, _mode: {})


# -- RTMR3: the workloads a TDX guest measured, replayed against its quote ---------------

DCAP = Path(__file__).resolve().parents[2] / "shared" / "testdata" / "dcap"


def test_the_event_format_is_fixed() -> None:
    import hashlib

    from tdapp.attest.eventlog import replay, workload_event

    event = workload_event(Workload("ab" * 32, "demo", "application"))
    assert event.line() == ('tdapp.dev workload {"measurement":"' + "ab" * 32
                            + '","service":"application","session":"demo"}')
    digest = hashlib.sha384(event.line().encode()).digest()
    assert replay([event]) == hashlib.sha384(bytes(48) + digest).digest()
    assert replay([]) == bytes(48)


@pytest.mark.parametrize("line", ["tdapp.dev  workload x", "tdapp.dev workload a\tb", "one",
                                  "tdapp.dev workload \u200ex"])
def test_a_malformed_event_line_is_refused(line: str) -> None:
    from tdapp.attest.eventlog import EventLogError, parse_log

    with pytest.raises(EventLogError):
        parse_log([line])


@pytest.mark.skipif(not DCAP.is_dir(), reason="../shared/testdata/dcap is missing")
def test_a_log_that_does_not_replay_to_the_quotes_rtmr3_is_refused() -> None:
    import base64

    from tdapp.attest import EvidenceError
    from tdapp.attest.dcap import DcapVerifier, collateral_from_file
    from tdapp.attest.eventlog import workload_event

    quote = base64.b64encode((DCAP / "tdx_quote").read_bytes()).decode()
    verifier = DcapVerifier("tdx", collateral=collateral_from_file(
        DCAP / "tdx_quote_collateral.json"))
    at = 1750331763
    # This real quote's RTMR3 is all zeros: an empty log replays to it ...
    claims = verifier.verify({"tee": "tdx", "quote": quote, "event_log": []}, at=at)
    assert claims.runtime_events == ()
    # ... and a log claiming a workload was measured does not.
    line = workload_event(Workload(MRENCLAVE, "s", "app")).line()
    with pytest.raises(EvidenceError, match="does not replay to the quote's RTMR3"):
        verifier.verify({"tee": "tdx", "quote": quote, "event_log": [line]}, at=at)
    with pytest.raises(EvidenceError, match="event_log"):
        verifier.verify({"tee": "tdx", "quote": quote, "event_log": "not a list"}, at=at)


def logged_claims(*workloads: Workload) -> Claims:
    from dataclasses import replace

    from tdapp.attest.eventlog import workload_event

    bound = Workload(MRENCLAVE, "cvm", "app")
    return replace(tdx_claims(MRTD, bound),
                   runtime_events=tuple(workload_event(w).line() for w in workloads))


def first_refusal(claims: Claims) -> str | None:
    session = parse_session(PINNED)
    service = session.service("app")
    assert service is not None
    for label, policy in checks_for(session, service, AttestationMode.HARDWARE, NONCE, KEY,
                                    Workload(MRENCLAVE, "cvm", "app"), claims.tee,
                                    runtime_events=bool(claims.runtime_events)):
        verdict = policy.verify(claims)
        if not verdict.ok:
            return f"{label}: {verdict.reason}"
    return None


def test_rtmr3_must_name_the_bound_workload_last() -> None:
    ours, theirs = Workload(MRENCLAVE, "cvm", "app"), Workload(OTHER, "cvm", "app")
    assert first_refusal(logged_claims(theirs, ours)) is None
    # The VM's last measured workload is another image: the bound one did not start here.
    refusal = first_refusal(logged_claims(ours, theirs))
    assert refusal is not None and refusal.startswith("rtmr3: RTMR3's last workload is " + OTHER)
    refusal = first_refusal(logged_claims(Workload(MRENCLAVE, "other-session", "app")))
    assert refusal is not None and refusal.startswith("rtmr3: ")

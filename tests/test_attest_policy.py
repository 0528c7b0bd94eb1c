"""Verification policies: each one's success and its exact reason for failing; composition."""

from __future__ import annotations

import dataclasses
import logging
from typing import Literal

import pytest

from tdapp.attest import (
    AllOf,
    AnyOf,
    Claims,
    DebugTolerated,
    Failure,
    MeasurementIn,
    PlatformIn,
    Policy,
    ReportDataIs,
    Success,
    TcbStatusTolerated,
    TeeIn,
    UnsafeNoOp,
    Verdict,
)

M1, M2, M3, M4, M5 = (f"{digit}" * 64 for digit in "12345")
PLATFORM = "ab" * 32
DATA = bytes(range(64))
CLAIMS = Claims(tee="sim", measurement=M1, report_data=DATA, platform=PLATFORM, debug=False,
                tcb_status="UpToDate")


def claims(**changes: object) -> Claims:
    return dataclasses.replace(CLAIMS, **changes)  # type: ignore[arg-type]


def reason(policy: Policy, subject: Claims = CLAIMS) -> str:
    verdict = policy.verify(subject)
    assert not verdict.ok and not verdict
    assert "\n" not in verdict.reason
    return verdict.reason


def holds(policy: Policy, subject: Claims = CLAIMS) -> bool:
    verdict = policy.verify(subject)
    assert verdict.ok == bool(verdict)
    assert (verdict.reason == "") == verdict.ok
    return verdict.ok


class Fixed:
    """A policy with a fixed verdict that counts how often it was asked."""

    def __init__(self, verdict: Verdict) -> None:
        self.verdict = verdict
        self.calls = 0

    def verify(self, claims: Claims) -> Verdict:
        self.calls += 1
        return self.verdict


# -- verdicts -------------------------------------------------------------------------------


def test_success_and_failure() -> None:
    assert Success().ok and Success().reason == "" and bool(Success())
    failure = Failure("no")
    assert not failure.ok and failure.reason == "no" and not failure
    assert isinstance(failure, Verdict) and isinstance(Success(), Verdict)
    assert Success() == Success() and Failure("a") == Failure("a") != Failure("b")
    assert repr(Failure("no")) == "Failure('no')" and repr(Success()) == "Success()"


def test_a_failure_needs_a_reason_of_one_line() -> None:
    with pytest.raises(ValueError):
        Failure("")
    with pytest.raises(ValueError):
        Failure(" \n ")
    assert Failure("two\nlines\r\n here").reason == "two lines here"


# -- single policies ----------------------------------------------------------------------


def test_measurement_in() -> None:
    assert holds(MeasurementIn([M2, M1]))
    assert holds(MeasurementIn([M1.upper()]))
    assert holds(MeasurementIn(M1))  # one string is one measurement, not its characters
    assert reason(MeasurementIn([M2])) == (
        f"measurement {M1} is not one of the session's mrenclaves (expected one of {M2})")


def test_measurement_in_lists_a_few_and_counts_the_rest() -> None:
    assert reason(MeasurementIn([M5, M4, M3, M2])) == (
        f"measurement {M1} is not one of the session's mrenclaves "
        f"(expected one of {M2}, {M3}, {M4} and 1 more)")


def test_measurement_in_nothing_accepts_nothing() -> None:
    assert reason(MeasurementIn([])) == (
        f"measurement {M1} is not one of the session's mrenclaves (none are listed)")


def test_report_data_is() -> None:
    assert holds(ReportDataIs(DATA))
    other = bytes(64)
    assert reason(ReportDataIs(other)) == (
        "report_data does not bind this nonce and key "
        "(expected 0000000000000000…, got 0001020304050607…)")
    assert reason(ReportDataIs(DATA[:32])).startswith("report_data does not bind")


def test_platform_in() -> None:
    assert holds(PlatformIn([PLATFORM.upper(), "cd" * 32]))
    assert reason(PlatformIn(["cd" * 32])) == (
        f"platform {PLATFORM} is not in the allowed platforms (allowed: {'cd' * 32})")
    assert reason(PlatformIn([])) == (
        f"platform {PLATFORM} is not in the allowed platforms (none are listed)")


def test_tee_in() -> None:
    assert holds(TeeIn(["sim", "sgx"]))
    assert holds(TeeIn("sim"))
    assert reason(TeeIn(["sgx", "tdx", "snp"], mode="hardware")) == (
        "sim evidence is not accepted for a session in hardware mode")
    assert reason(TeeIn(["tdx", "sgx"])) == "sim evidence is not accepted (accepted: sgx, tdx)"


@pytest.mark.parametrize(("debug", "tolerated", "ok"), [
    (False, False, True), (False, True, True), (True, True, True), (True, False, False)])
def test_debug_tolerated(debug: bool, tolerated: bool, ok: bool) -> None:
    verdict = DebugTolerated(tolerated).verify(claims(debug=debug))
    assert verdict.ok is ok
    if not ok:
        assert verdict.reason == "debug-mode evidence needs tolerate: [debug-mode]"


TCB_TABLE: list[tuple[str, tuple[str, ...], str | None]] = [
    ("UpToDate", (), None),
    ("SWHardeningNeeded", (), "TCB status SWHardeningNeeded needs tolerate: "
                              "[software-hardening-needed]"),
    ("SWHardeningNeeded", ("software-hardening-needed",), None),
    ("ConfigurationNeeded", (), "TCB status ConfigurationNeeded needs tolerate: "
                                "[hyperthreading (or insecure-configuration)]"),
    ("ConfigurationNeeded", ("hyperthreading",), None),
    ("ConfigurationNeeded", ("insecure-configuration",), None),
    ("ConfigurationNeeded", ("software-hardening-needed",),
     "TCB status ConfigurationNeeded needs tolerate: "
     "[hyperthreading (or insecure-configuration)]"),
    ("ConfigurationAndSWHardeningNeeded", (),
     "TCB status ConfigurationAndSWHardeningNeeded needs tolerate: "
     "[software-hardening-needed, hyperthreading (or insecure-configuration)]"),
    ("ConfigurationAndSWHardeningNeeded", ("hyperthreading",),
     "TCB status ConfigurationAndSWHardeningNeeded needs tolerate: "
     "[software-hardening-needed]"),
    ("ConfigurationAndSWHardeningNeeded", ("software-hardening-needed",),
     "TCB status ConfigurationAndSWHardeningNeeded needs tolerate: "
     "[hyperthreading (or insecure-configuration)]"),
    ("ConfigurationAndSWHardeningNeeded", ("software-hardening-needed", "hyperthreading"),
     None),
    ("OutOfDate", (), "TCB status OutOfDate needs tolerate: [outdated-tcb]"),
    ("OutOfDate", ("debug-mode", "hyperthreading"),
     "TCB status OutOfDate needs tolerate: [outdated-tcb]"),
    ("OutOfDate", ("outdated-tcb",), None),
    ("OutOfDateConfigurationNeeded", ("outdated-tcb",),
     "TCB status OutOfDateConfigurationNeeded needs tolerate: "
     "[hyperthreading (or insecure-configuration)]"),
    ("OutOfDateConfigurationNeeded", ("insecure-configuration",),
     "TCB status OutOfDateConfigurationNeeded needs tolerate: [outdated-tcb]"),
    ("OutOfDateConfigurationNeeded", ("outdated-tcb", "insecure-configuration"), None),
    ("Revoked", (), "TCB status Revoked is never accepted"),
    ("Revoked", ("outdated-tcb", "software-hardening-needed", "hyperthreading",
                 "insecure-configuration", "debug-mode"), "TCB status Revoked is never accepted"),
    ("Fine", ("outdated-tcb",), "TCB status 'Fine' is unknown and not accepted (known: "
                                "UpToDate, SWHardeningNeeded, ConfigurationNeeded, "
                                "ConfigurationAndSWHardeningNeeded, OutOfDate, "
                                "OutOfDateConfigurationNeeded)"),
]


@pytest.mark.parametrize(("status", "tolerations", "expected"), TCB_TABLE)
def test_tcb_status_table(status: str, tolerations: tuple[str, ...],
                          expected: str | None) -> None:
    policy = TcbStatusTolerated(tolerations, ())
    if expected is None:
        assert holds(policy, claims(tcb_status=status))
    else:
        assert reason(policy, claims(tcb_status=status)) == expected


@pytest.mark.parametrize(("advisories", "ignored", "expected"), [
    ((), (), None),
    (("INTEL-SA-00161",), (), "advisory INTEL-SA-00161 is not in ignore_advisories"),
    (("INTEL-SA-00161",), ("INTEL-SA-00161",), None),
    (("INTEL-SA-00334", "INTEL-SA-00161"), ("INTEL-SA-00219",),
     "advisories INTEL-SA-00161, INTEL-SA-00334 are not in ignore_advisories"),
    (("INTEL-SA-00334", "INTEL-SA-00161"), ("INTEL-SA-00161",),
     "advisory INTEL-SA-00334 is not in ignore_advisories"),
    (("INTEL-SA-00334", "INTEL-SA-00161"), "*", None),
    (("INTEL-SA-00334",), ("*",), None),  # as the session parser normalizes "*"
    (("INTEL-SA-00334",), "INTEL-SA-00334", None),  # one string is one advisory
])
def test_advisories_must_be_ignored(advisories: tuple[str, ...],
                                    ignored: tuple[str, ...] | Literal["*"],
                                    expected: str | None) -> None:
    subject = claims(tcb_status="SWHardeningNeeded", advisories=advisories)
    policy = TcbStatusTolerated(["software-hardening-needed"], ignored)
    if expected is None:
        assert holds(policy, subject)
    else:
        assert reason(policy, subject) == expected


def test_the_tcb_status_is_judged_before_advisories() -> None:
    subject = claims(tcb_status="OutOfDate", advisories=("INTEL-SA-00161",))
    assert reason(TcbStatusTolerated((), "*"), subject) == (
        "TCB status OutOfDate needs tolerate: [outdated-tcb]")


# -- composition -------------------------------------------------------------------------


def test_all_of_holds_when_every_policy_does() -> None:
    assert holds(AllOf([TeeIn(["sim"]), MeasurementIn([M1]), ReportDataIs(DATA)]))


def test_all_of_answers_with_the_first_failure() -> None:
    later = Fixed(Failure("second"))
    policy = AllOf([Fixed(Success()), MeasurementIn([M2]), later])
    assert reason(policy).startswith(f"measurement {M1} is not one of")
    assert later.calls == 0


def test_all_of_nothing_accepts_nothing() -> None:
    assert reason(AllOf([])) == "no policy to check (an empty AllOf accepts nothing)"


def test_any_of_holds_when_one_policy_does() -> None:
    first = Fixed(Failure("first"))
    assert holds(AnyOf([first, MeasurementIn([M1]), Fixed(Failure("third"))]))
    assert first.calls == 1


def test_any_of_joins_every_distinct_reason() -> None:
    policy = AnyOf([Fixed(Failure("first")), Fixed(Failure("second")), Fixed(Failure("first"))])
    assert reason(policy) == "first; second"


def test_any_of_nothing_accepts_nothing() -> None:
    assert reason(AnyOf(iter([]))) == "no alternative to check (an empty AnyOf accepts nothing)"


def test_composition_nests() -> None:
    # A service with two attestation variants, within a hardware session.
    variants = AnyOf([AllOf([MeasurementIn([M2])]), AllOf([MeasurementIn([M3])])])
    policy = AllOf([TeeIn(["sim"]), variants, DebugTolerated(False)])
    assert reason(policy) == (
        f"measurement {M1} is not one of the session's mrenclaves (expected one of {M2}); "
        f"measurement {M1} is not one of the session's mrenclaves (expected one of {M3})")
    assert holds(AllOf([TeeIn(["sim"]), AnyOf([variants, MeasurementIn([M1])])]))


def test_unsafe_no_op_accepts_anything_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="tdapp.attest"):
        assert holds(UnsafeNoOp(), claims(debug=True, tcb_status="Revoked"))
    assert "UnsafeNoOp" in caplog.text


def test_policies_show_what_they_check() -> None:
    assert repr(DebugTolerated(True)) == "DebugTolerated(tolerated=True)"
    assert repr(UnsafeNoOp()) == "UnsafeNoOp()"
    assert "MeasurementIn" in repr(AllOf([MeasurementIn([M1])]))

"""Verification policies: do the Claims of verified evidence satisfy a session?

Each policy is a small object whose ``verify(claims)`` returns a
:class:`Verdict`, a success or a failure with a one-line reason that names what
was expected and what was seen (never a secret). Policies compose with
:class:`AllOf` and :class:`AnyOf`; the CAS builds one from a session's
``security.attestation`` and a service's ``mrenclaves``. A policy must never
raise for claims it dislikes, nor succeed by default: an empty allow-list, an
empty AllOf and an empty AnyOf all fail. The only policy that accepts without
checking is named Unsafe….
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Literal, Protocol

from tdapp.attest.binding import Workload
from tdapp.attest.claims import Claims
from tdapp.attest.eventlog import EventLogError, RuntimeEvent, last_workload

log = logging.getLogger("tdapp.attest")
ALL_ADVISORIES = "*"
_SHOWN = 3  # allowed values listed in a reason before "and N more"


@dataclass(frozen=True)
class Verdict:
    """The outcome of a policy: ``ok``, or not ``ok`` with a one-line ``reason``."""

    ok: bool
    reason: str = ""

    def __post_init__(self) -> None:
        # Reasons reach logs and HTTP answers: squash them to one line.
        object.__setattr__(self, "reason", " ".join(self.reason.split()))
        if self.ok == bool(self.reason):
            raise ValueError("a success has no reason and a failure must have one")

    def __bool__(self) -> bool:
        return self.ok


class Success(Verdict):
    def __init__(self) -> None:
        super().__init__(True, "")

    def __repr__(self) -> str:
        return "Success()"


class Failure(Verdict):
    def __init__(self, reason: str) -> None:
        super().__init__(False, reason)

    def __repr__(self) -> str:
        return f"Failure({self.reason!r})"


class Policy(Protocol):
    def verify(self, claims: Claims) -> Verdict:
        """Success if ``claims`` satisfy this policy, else a Failure saying why."""
        ...


class _Shown:
    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={value!r}" for name, value in vars(self).items())
        return f"{type(self).__name__}({fields})"


class MeasurementIn(_Shown):
    """The measurement (MRENCLAVE, …) is one of the session's; hex compared case-blind."""

    def __init__(self, measurements: Collection[str]) -> None:
        self.measurements = frozenset(value.lower() for value in _strings(measurements))

    def verify(self, claims: Claims) -> Verdict:
        if claims.measurement.lower() in self.measurements:
            return Success()
        return Failure(f"measurement {claims.measurement} is not one of the session's "
                       f"mrenclaves ({_expected(self.measurements, 'expected one of')})")


class WorkloadIn(_Shown):
    """The workload the evidence binds (the tdapp image measurement in ``report_data``) is
    one of the session's.

    In a confidential VM the hardware measures the VM, so this, together with
    :class:`ReportDataIs` for the same workload, is what pins the program. The
    claimed workload comes from the request; it counts only because the
    binding check proves the evidence carries it.
    """

    def __init__(self, measurements: Collection[str], claimed: str) -> None:
        self.measurements = frozenset(value.lower() for value in _strings(measurements))
        self.claimed = claimed.lower()

    def verify(self, claims: Claims) -> Verdict:
        if self.claimed in self.measurements:
            return Success()
        return Failure(f"workload {self.claimed} is not one of the variant's mrenclaves "
                       f"({_expected(self.measurements, 'expected one of')})")


class WorkloadIsMeasured(_Shown):
    """The bound workload is the measurement the platform signed (``sim``: what the LAS
    was asked to sign is what the runtime says it runs)."""

    def __init__(self, claimed: str) -> None:
        self.claimed = claimed.lower()

    def verify(self, claims: Claims) -> Verdict:
        if self.claimed == claims.measurement.lower():
            return Success()
        return Failure(f"the evidence binds workload {self.claimed} but measures "
                       f"{claims.measurement}")


class LoggedWorkloadIs(_Shown):
    """The last workload a TDX guest's runtime event log (replayed to RTMR3 when the
    quote was verified) names is the workload the evidence binds."""

    def __init__(self, workload: Workload) -> None:
        self.workload = workload

    def verify(self, claims: Claims) -> Verdict:
        try:
            logged = last_workload([RuntimeEvent.parse(line) for line in claims.runtime_events])
        except EventLogError as error:
            return Failure(f"the runtime event log is malformed: {error}")
        if logged is None:
            return Failure("the runtime event log names no tdapp workload")
        if logged != self.workload:
            return Failure(f"RTMR3's last workload is {logged.measurement} for "
                           f"{logged.session}/{logged.service}, not the bound "
                           f"{self.workload.measurement} for {self.workload.session}/"
                           f"{self.workload.service}")
        return Success()


class SgxSignerIs(_Shown):
    """SGX signer-based identity: MRSIGNER and ISVPRODID equal, ISVSVN within bounds."""

    def __init__(self, mrsigner: str, isvprodid: int, *, isvsvn: int | None = None,
                 isvsvn_min: int | None = None, isvsvn_max: int | None = None) -> None:
        self.mrsigner, self.isvprodid = mrsigner.lower(), isvprodid
        self.isvsvn, self.isvsvn_min, self.isvsvn_max = isvsvn, isvsvn_min, isvsvn_max

    def verify(self, claims: Claims) -> Verdict:
        if claims.tee != "sgx":
            return Failure(f"{claims.tee} evidence has no SGX signer (the variant names one)")
        signer = str(claims.values.get("mrsigner", "")).lower()
        if signer != self.mrsigner:
            return Failure(f"mrsigner {signer} is not the session's ({self.mrsigner})")
        product, svn = claims.values.get("isvprodid"), claims.values.get("isvsvn")
        if product != self.isvprodid:
            return Failure(f"isvprodid {product} is not the session's ({self.isvprodid})")
        if not isinstance(svn, int):
            return Failure("the evidence has no isvsvn")
        if self.isvsvn is not None and svn != self.isvsvn:
            return Failure(f"isvsvn {svn} is not the session's ({self.isvsvn})")
        if self.isvsvn_min is not None and svn < self.isvsvn_min:
            return Failure(f"isvsvn {svn} is below the session's minimum {self.isvsvn_min}")
        if self.isvsvn_max is not None and svn > self.isvsvn_max:
            return Failure(f"isvsvn {svn} is above the session's maximum {self.isvsvn_max}")
        return Success()


class ClaimsMatch(_Shown):
    """Evidence of TEE ``tee`` whose named claims each take one of the expected values."""

    def __init__(self, tee: str, expected: Mapping[str, Collection[str | int]]) -> None:
        self.tee = tee
        self.expected = {name: frozenset(_normal(value) for value in values)
                         for name, values in expected.items()}

    def verify(self, claims: Claims) -> Verdict:
        if claims.tee != self.tee:
            return Failure(f"{claims.tee} evidence does not match a {self.tee} attestation "
                           "variant")
        for name, allowed in sorted(self.expected.items()):
            actual = claims.values.get(name)
            if actual is None or _normal(actual) not in allowed:
                shown = ", ".join(str(value) for value in sorted(allowed, key=str)[:_SHOWN])
                return Failure(f"{self.tee} {name} {actual} is not the session's "
                               f"(expected {shown})")
        return Success()


def _normal(value: str | int) -> str | int:
    return value.lower() if isinstance(value, str) else value


class ReportDataIs(_Shown):
    """The evidence's report_data is exactly the binding of this run's nonce and key."""

    def __init__(self, expected: bytes) -> None:
        self.expected = bytes(expected)

    def verify(self, claims: Claims) -> Verdict:
        if hmac.compare_digest(claims.report_data, self.expected):
            return Success()
        # Hash prefixes are enough to tell a wrong nonce from a wrong encoding.
        return Failure(f"report_data does not bind this nonce and key "
                       f"(expected {self.expected.hex()[:16]}…, "
                       f"got {claims.report_data.hex()[:16]}…)")


class PlatformIn(_Shown):
    """The attesting platform is one the session allows (its ``platforms``)."""

    def __init__(self, platforms: Collection[str]) -> None:
        self.platforms = frozenset(value.lower() for value in _strings(platforms))

    def verify(self, claims: Claims) -> Verdict:
        if claims.platform.lower() in self.platforms:
            return Success()
        return Failure(f"platform {claims.platform} is not in the allowed platforms "
                       f"({_expected(self.platforms, 'allowed:')})")


class TeeIn(_Shown):
    """The evidence comes from an accepted kind of TEE; ``mode`` names the session's mode."""

    def __init__(self, tees: Collection[str], *, mode: str | None = None) -> None:
        self.tees = frozenset(_strings(tees))
        self.mode = mode

    def verify(self, claims: Claims) -> Verdict:
        if claims.tee in self.tees:
            return Success()
        if self.mode is not None:
            return Failure(f"{claims.tee} evidence is not accepted for a session in "
                           f"{self.mode} mode")
        return Failure(f"{claims.tee} evidence is not accepted "
                       f"({_expected(self.tees, 'accepted:')})")


class DebugTolerated(_Shown):
    """Debug-mode evidence (whose memory the host can read) only with ``tolerate: [debug-mode]``."""

    def __init__(self, tolerated: bool) -> None:
        self.tolerated = tolerated

    def verify(self, claims: Claims) -> Verdict:
        if not claims.debug or self.tolerated:
            return Success()
        return Failure("debug-mode evidence needs tolerate: [debug-mode]")


_CONFIGURATION = ("hyperthreading", "insecure-configuration")
# Intel's TCB status -> the tolerations it needs: every group, any member of a group.
TCB_NEEDS: dict[str, tuple[tuple[str, ...], ...]] = {
    "UpToDate": (),
    "SWHardeningNeeded": (("software-hardening-needed",),),
    "ConfigurationNeeded": (_CONFIGURATION,),
    "ConfigurationAndSWHardeningNeeded": (("software-hardening-needed",), _CONFIGURATION),
    "OutOfDate": (("outdated-tcb",),),
    "OutOfDateConfigurationNeeded": (("outdated-tcb",), _CONFIGURATION),
}
NEVER_ACCEPTED = frozenset({"Revoked"})


class TcbStatusTolerated(_Shown):
    """The platform's TCB status is tolerated, and each of its advisories is ignored.

    ``ignore_advisories`` is a list of advisory ids or ``"*"`` (alone or in the
    list) for all of them. A revoked or unknown status is never accepted.
    """

    def __init__(self, tolerations: Collection[str],
                 ignore_advisories: Collection[str] | Literal["*"]) -> None:
        self.tolerations = frozenset(_strings(tolerations))
        self.ignore_advisories = frozenset(_strings(ignore_advisories))

    def verify(self, claims: Claims) -> Verdict:
        status = claims.tcb_status
        if status in NEVER_ACCEPTED:
            return Failure(f"TCB status {status} is never accepted")
        if status not in TCB_NEEDS:
            return Failure(f"TCB status {status!r} is unknown and not accepted "
                           f"(known: {', '.join(TCB_NEEDS)})")
        missing = [group for group in TCB_NEEDS[status] if not self.tolerations & set(group)]
        if missing:
            needs = ", ".join(group[0] + "".join(f" (or {alt})" for alt in group[1:])
                              for group in missing)
            return Failure(f"TCB status {status} needs tolerate: [{needs}]")
        if ALL_ADVISORIES in self.ignore_advisories:
            return Success()
        open_advisories = sorted(set(claims.advisories) - self.ignore_advisories)
        if len(open_advisories) == 1:
            return Failure(f"advisory {open_advisories[0]} is not in ignore_advisories")
        if open_advisories:
            return Failure(f"advisories {', '.join(open_advisories)} are not in "
                           "ignore_advisories")
        return Success()


class AllOf(_Shown):
    """Every policy holds; the first failure is the answer. Empty: fails."""

    def __init__(self, policies: Iterable[Policy]) -> None:
        self.policies = tuple(policies)

    def verify(self, claims: Claims) -> Verdict:
        if not self.policies:
            return Failure("no policy to check (an empty AllOf accepts nothing)")
        for policy in self.policies:
            verdict = policy.verify(claims)
            if not verdict.ok:
                return verdict
        return Success()


class AnyOf(_Shown):
    """At least one policy holds; otherwise every distinct reason, joined. Empty: fails."""

    def __init__(self, policies: Iterable[Policy]) -> None:
        self.policies = tuple(policies)

    def verify(self, claims: Claims) -> Verdict:
        if not self.policies:
            return Failure("no alternative to check (an empty AnyOf accepts nothing)")
        reasons: dict[str, None] = {}
        for policy in self.policies:
            verdict = policy.verify(claims)
            if verdict.ok:
                return Success()
            reasons[verdict.reason] = None
        return Failure("; ".join(reasons))


class UnsafeNoOp(_Shown):
    """Accepts any claims, or none, without checking anything: only for ``mode: none``.

    With it, a secret goes to whoever asks; it protects nothing.
    """

    def verify(self, claims: Claims | None) -> Verdict:
        log.warning("attestation policy UnsafeNoOp: %s accepted without any check",
                    "no evidence" if claims is None else f"{claims.tee} evidence")
        return Success()


def _strings(values: Collection[str]) -> tuple[str, ...]:
    # A lone string is one value, not a collection of characters.
    return (values,) if isinstance(values, str) else tuple(values)


def _expected(values: Collection[str], label: str) -> str:
    if not values:
        return "none are listed"
    ordered = sorted(values)
    shown = ", ".join(ordered[:_SHOWN])
    more = f" and {len(ordered) - _SHOWN} more" if len(ordered) > _SHOWN else ""
    return f"{label} {shown}{more}"

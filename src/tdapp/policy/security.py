"""The ``security`` section: how strictly the CAS attests the session's services.

``mode`` None means the document did not say; the CAS then fixes it when it
stores the session (``hardware``, or on a ``--debug`` CAS ``sim`` with the
platforms of the LAS it trusts, as SCONE's public debug CAS does), so the mode
is part of what the session's hash covers and no later flag changes it.
Tolerations are a closed list so that a misspelt one is an error rather than a
silently stricter (or looser) policy. The language accepts all of SCONE's
modes and tolerations; which of them tdapp enforces is decided in
:mod:`tdapp.policy.enforced`, which refuses the others at creation. This
module describes settings; it must never weaken one on its own.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, model_validator

from tdapp.policy.base import Section
from tdapp.policy.values import (
    Flag,
    Hash,
    OneOrMany,
    OtpSecret,
    SortedSet,
    Text,
    fail,
    quoted,
)


class AttestationMode(StrEnum):
    """How the CAS attests a session's services (``security.attestation.mode``)."""

    HARDWARE = "hardware"  # verified SGX, TDX or SEV-SNP evidence only
    SIM = "sim"  # also LAS-signed evidence, from the platforms the session names
    NONE = "none"  # no attestation: whoever asks gets the configuration (UnsafeNoOp)
    MAA = "maa"  # Microsoft Azure Attestation: in the language, refused at creation


Toleration = Literal["debug-mode", "hyperthreading", "insecure-igpu",
                     "software-hardening-needed", "aepic-leak", "insecure-configuration",
                     "outdated-tcb", "maa-managed-tcb"]
ALL_ADVISORIES = "*"


def _advisory(value: str) -> str:
    if value != ALL_ADVISORIES and not all(char.isalnum() or char in "-_." for char in value):
        fail(f"{quoted(value)} is not an advisory id (like INTEL-SA-00161) or \"*\"")
    if not value:
        fail("an advisory id is empty")
    return value


def _advisories(values: tuple[str, ...]) -> tuple[str, ...]:
    # "*" (alone or in the list) ignores every advisory; it stands alone.
    if ALL_ADVISORIES in values:
        return (ALL_ADVISORIES,)
    return tuple(sorted(set(values)))


def _https_url(value: str) -> str:
    if not value.startswith("https://") or len(value) <= len("https://") or any(
            char.isspace() for char in value):
        fail(f"{quoted(value)} is not an https:// URL")
    return value


Advisories = Annotated[tuple[Annotated[Text, AfterValidator(_advisory)], ...], OneOrMany,
                       AfterValidator(_advisories)]
Tolerations = Annotated[tuple[Toleration, ...], OneOrMany, SortedSet]
PlatformIds = Annotated[tuple[Hash, ...], OneOrMany, SortedSet]


class Attestation(Section):
    """``security.attestation``: the attestation mode and what it tolerates."""

    mode: AttestationMode | None = None
    tolerate: Tolerations = ()
    ignore_advisories: Advisories = ()
    platforms: PlatformIds = ()
    trusted_scone_qe_pubkeys: PlatformIds = ()
    url: Annotated[Text, AfterValidator(_https_url)] | None = None
    one_time_password_shared_secret: OtpSecret | None = Field(default=None, repr=False)

    @model_validator(mode="after")
    def _maa(self) -> Attestation:
        if self.mode is AttestationMode.MAA:
            if self.url is None:
                fail("mode maa needs the url of the Azure attestation provider", "mode")
            if "maa-managed-tcb" not in self.tolerate:
                fail("mode maa needs tolerate: [maa-managed-tcb] (MAA reports no TCB status)",
                     "tolerate")
        elif self.url is not None:
            fail("url only applies to mode maa", "url")
        return self


class Security(Section):
    """``security``: attestation settings and second factors for the whole session."""

    attestation: Attestation = Attestation()
    service_access_token: Text | None = Field(default=None, repr=False)
    singleton_enclaves: Flag = False

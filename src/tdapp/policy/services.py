"""The ``services`` section: what runs, how it is started, and which code may be it.

A service's configuration (command, environment, working directory, main
FSPF) is released only to code that passes one of its attestation variants.
This module owns the shape of that configuration and how a command string is
split into arguments; it must never turn an ill-formed command into some
other command than the one written.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BeforeValidator, Field, model_validator

from tdapp.policy.base import Frozen
from tdapp.policy.values import (
    U16,
    U64,
    AbsolutePath,
    Flag,
    FspfKey,
    FspfTag,
    Hash,
    ImageName,
    Many,
    Measurements,
    OtpSecret,
    Register,
    Registers,
    ServiceName,
    Tags,
    as_text,
    describe,
    fail,
    is_placeholder,
    quoted,
)

HOST_ENV_PREFIX = "\\@\\@"
"""Environment keys starting with ``\\@\\@`` take their value from the host (SCONE)."""


class Signer(Frozen):
    """Signer-based SGX attestation: who signed the enclave, for which product."""

    mrsigner: Hash
    isvprodid: U16
    isvsvn: U16 | None = None
    isvsvn_min: U16 | None = None
    isvsvn_max: U16 | None = None

    @model_validator(mode="after")
    def _svn_forms(self) -> Signer:
        if self.isvsvn is not None and (self.isvsvn_min is not None
                                        or self.isvsvn_max is not None):
            fail("give isvsvn or a range (isvsvn_min, isvsvn_max), not both", "isvsvn")
        if (self.isvsvn_min is not None and self.isvsvn_max is not None
                and self.isvsvn_min > self.isvsvn_max):
            fail("isvsvn_min is greater than isvsvn_max", "isvsvn_min")
        return self


class TdxFactors(Frozen):
    """What a TDX guest's quote must show: MRTD one of ``mrtd``, and each given register."""

    mrtd: Registers = ()
    rtmr0: Register | None = None
    rtmr1: Register | None = None
    rtmr2: Register | None = None
    rtmr3: Register | None = None
    mrconfigid: Register | None = None

    @model_validator(mode="after")
    def _has_mrtd(self) -> TdxFactors:
        if not self.mrtd:
            fail("a tdx factor needs mrtd (the measurement of the TD)", "mrtd")
        return self

    def expected(self) -> dict[str, frozenset[str | int]]:
        registers = {name: getattr(self, name) for name in
                     ("rtmr0", "rtmr1", "rtmr2", "rtmr3", "mrconfigid")}
        return {"mrtd": frozenset(self.mrtd),
                **{name: frozenset({value}) for name, value in registers.items()
                   if value is not None}}


class SnpFactors(Frozen):
    """What an SEV-SNP guest's report must show: MEASUREMENT one of ``measurement``, and
    HOST_DATA and the guest POLICY when given."""

    measurement: Registers = ()
    host_data: Hash | None = None
    policy: U64 | None = None

    @model_validator(mode="after")
    def _has_measurement(self) -> SnpFactors:
        if not self.measurement:
            fail("an snp factor needs measurement (the launch digest)", "measurement")
        return self

    def expected(self) -> dict[str, frozenset[str | int]]:
        result: dict[str, frozenset[str | int]] = {"measurement": frozenset(self.measurement)}
        if self.host_data is not None:
            result["host_data"] = frozenset({self.host_data})
        if self.policy is not None:
            result["policy"] = frozenset({self.policy})
        return result


class AttestationVariant(Frozen):
    """One way to pass attestation: all of its factors must hold.

    With ``tdx`` or ``snp`` (a confidential VM, which the hardware measures as a
    whole) ``mrenclave`` names the workload: the tdapp image measurement the
    runtime binds into the evidence. Such a variant must name one, or say
    ``unsafe_any_workload: true``: then any program in that VM gets the keys.
    """

    mrenclave: Measurements = ()
    signer: Signer | None = None
    tdx: TdxFactors | None = None
    snp: SnpFactors | None = None
    unsafe_any_workload: Flag = False

    @model_validator(mode="after")
    def _has_a_factor(self) -> AttestationVariant:
        if not self.mrenclave and self.signer is None and self.tdx is None and self.snp is None:
            # An empty variant would admit any code at all.
            fail("an attestation variant needs mrenclave, signer, tdx or snp")
        vm = self.tdx is not None or self.snp is not None
        if vm and not self.mrenclave and not self.unsafe_any_workload:
            fail("a tdx or snp variant pins the VM, not the program in it: name the "
                 "workload (mrenclave: the tdapp image measurement, tdapp measure NAME "
                 "prints it), or say unsafe_any_workload: true", "tdx" if self.tdx else "snp")
        if self.unsafe_any_workload and (self.mrenclave or not vm):
            fail("unsafe_any_workload applies only to a tdx or snp variant without "
                 "mrenclave", "unsafe_any_workload")
        return self


def _variants(value: object) -> object:
    # The mapping form is one variant; the list form is alternatives.
    variants = [value] if isinstance(value, dict) else value
    if isinstance(variants, list):
        for index, variant in enumerate(variants):
            if is_placeholder(variant):
                fail("an attestation variant given as a $$SCONE::…$$ placeholder cannot be "
                     "checked: tdapp does not resolve placeholders; write its mrenclave out",
                     index)
    return variants


def _command(value: object) -> object:
    value = as_text(value)
    if isinstance(value, str):
        try:
            words = split_command(value)
        except ValueError as error:
            fail(str(error))
        if not words or not words[0]:
            fail("command names no program")
        return value
    if isinstance(value, list | tuple):
        if not value or not as_text(value[0]):
            fail("command names no program")
        arguments = [as_text(item) for item in value]
        for index, item in enumerate(arguments):
            if not isinstance(item, str):
                fail(f"expected a string, got {describe(item)}", index)
            if "\x00" in item:
                fail("contains a NUL character", index)
        return tuple(arguments)
    fail(f"expected a string or a list of strings, got {describe(value)}")


def split_command(command: str) -> list[str]:
    """SCONE's splitting of a command string: whitespace separates, quotes group.

    Text in '…' or "…" is taken literally (quotes removed) and joins any text it
    touches; there are no backslash escapes. ``ValueError`` for an unclosed quote
    or a NUL character (arguments are C strings).
    """
    if "\x00" in command:
        raise ValueError("contains a NUL character")
    words: list[str] = []
    current: list[str] = []
    in_word = False
    quote: str | None = None
    for char in command:
        if quote is not None:
            if char == quote:
                quote = None
            else:
                current.append(char)
        elif char in "'\"":
            quote, in_word = char, True
        elif char.isspace():
            if in_word:
                words.append("".join(current))
                current, in_word = [], False
        else:
            current.append(char)
            in_word = True
    if quote is not None:
        raise ValueError(f"command has an unclosed {quote} quote")
    if in_word:
        words.append("".join(current))
    return words


def _env_name(name: str) -> str:
    if not name or "=" in name or "\x00" in name:
        fail(f"{quoted(name)} is not a valid environment variable name (empty, or has '=' or NUL)")
    return name


def _env_value(value: object) -> object:
    # Numbers and booleans are written as they were typed (`SCONE_LOG: 7` is "7").
    value = as_text(value)
    if isinstance(value, str) and "\x00" in value:
        fail("contains a NUL character")
    return value


EnvName = Annotated[str, AfterValidator(_env_name)]
EnvValue = Annotated[str | None, BeforeValidator(_env_value)]
Command = Annotated[str | tuple[str, ...], BeforeValidator(_command)]
Persistency = Literal["None"]


class Service(Frozen):
    """One service: a program, its configuration, and who may be it."""

    name: ServiceName
    image_name: ImageName | None = None
    mrenclaves: Measurements = ()
    attestation: Annotated[tuple[AttestationVariant, ...], Many,
                           BeforeValidator(_variants)] = ()
    tags: Tags = ()
    command: Command | None = None
    pwd: AbsolutePath | None = None
    # Values may be credentials (an API token): names only in a repr.
    environment: Annotated[dict[EnvName, EnvValue], BeforeValidator(
        lambda value: {} if value is None else value)] = Field(default_factory=dict, repr=False)
    fspf_path: AbsolutePath | None = None
    fspf_key: FspfKey | None = Field(default=None, repr=False)  # a key: never in a repr
    fspf_tag: FspfTag | None = None
    one_time_password_shared_secret: OtpSecret | None = Field(default=None, repr=False)
    persistency: Persistency | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Service:
        if self.mrenclaves and self.attestation:
            fail("give either mrenclaves or attestation, not both", "attestation")
        fspf = {"fspf_path": self.fspf_path, "fspf_key": self.fspf_key,
                "fspf_tag": self.fspf_tag}
        given = [key for key, value in fspf.items() if value is not None]
        if given and len(given) != len(fspf):
            missing = ", ".join(key for key in fspf if key not in given)
            fail(f"a main FSPF needs fspf_path, fspf_key and fspf_tag; {missing} missing",
                 given[0])
        return self

    def argv(self) -> list[str]:
        """The program and its arguments (``@@N`` host arguments not yet expanded)."""
        if self.command is None:
            return []
        if isinstance(self.command, tuple):
            return list(self.command)
        return split_command(self.command)

    def attestation_variants(self) -> tuple[AttestationVariant, ...]:
        """The variants code may satisfy; legacy ``mrenclaves`` count as one variant."""
        if self.mrenclaves:
            return (AttestationVariant(mrenclave=self.mrenclaves),)
        return self.attestation

    def host_environment(self) -> tuple[str, ...]:
        """Names of the variables the host supplies (the ``\\@\\@NAME`` keys)."""
        return tuple(key[len(HOST_ENV_PREFIX):] for key in self.environment
                     if key.startswith(HOST_ENV_PREFIX))

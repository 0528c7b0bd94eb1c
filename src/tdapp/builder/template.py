"""The session template ``tdapp build -o`` writes, in the seed's 2018 form.

Owns that text: service ``application`` running the image's entrypoint in
``/``, the two volumes the client fills (``$INPUT_FSPF_KEY`` …), and the image
with its mrenclaves and mount points ``/encryptedInputs`` and
``/encryptedOutputs``, and its attestation mode: ``hardware``, or ``sim``
accepting only the LAS platform it names (the LAS's id when ``tdapp build``
could ask it, else ``$LAS_PLATFORM``, which the client fills from its LAS).
For a confidential VM (``TemplateTee.TDX``/``SNP``) the service's variant has
both halves: the VM (MRTD and RTMR0-2, or the SNP launch measurement, from
``vm`` or as ``$TDX_MRTD`` … placeholders the client fills) and the workload
(the image's measurement as the variant's ``mrenclave``). Must never write a
value that ``tdapp.policy.parse_session`` would read differently after
filling, nor a VM variant without its workload.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path
from typing import assert_never

from tdapp.builder.manifest import join_command
from tdapp.builder.store import Image
from tdapp.core.atomic import write_atomically
from tdapp.errors import InputError
from tdapp.policy.template import LAS_PLATFORM_VARIABLE

INPUT_VOLUME = "encrypted-input-files"
OUTPUT_VOLUME = "encrypted-output-files"
INPUT_PATH = "/encryptedInputs"
OUTPUT_PATH = "/encryptedOutputs"
SERVICE = "application"
_PLATFORM = re.compile(r"[0-9a-f]{64}")
_REGISTER = re.compile(r"[0-9a-f]{96}")


class TemplateTee(StrEnum):
    """Where the image is meant to run, which decides the template's attestation."""

    SIM = "sim"  # the LAS: development only
    SGX = "sgx"  # an enclave: MRENCLAVE is measured by the hardware
    TDX = "tdx"  # a TDX confidential VM: the VM's registers and the bound workload
    SNP = "snp"  # an SEV-SNP confidential VM: its launch measurement and the workload


# The VM half of a confidential VM's variant: name in the file, template variable.
VM_FIELDS = {TemplateTee.TDX: {"mrtd": "TDX_MRTD", "rtmr0": "TDX_RTMR0", "rtmr1": "TDX_RTMR1",
                               "rtmr2": "TDX_RTMR2"},
             TemplateTee.SNP: {"measurement": "SNP_MEASUREMENT"}}


def vm_values(tee: TemplateTee, given: Mapping[str, object]) -> dict[str, str]:
    """The VM half from a ``--vm-measurements`` document, checked (96 hex each)."""
    fields = VM_FIELDS.get(tee)
    if fields is None:
        raise InputError(f"--vm-measurements applies to tdx and snp templates, not {tee}")
    unknown = sorted(set(given) - set(fields))
    if unknown:
        raise InputError(f"unknown VM measurement {unknown[0][:40]!r} for {tee} "
                         f"(expected {', '.join(fields)})")
    values = {}
    for name, value in given.items():
        if not isinstance(value, str) or not _REGISTER.fullmatch(value.lower()):
            raise InputError(f"VM measurement {name} must be 96 hex characters")
        values[name] = value.lower()
    return values

# Starts with a character that begins no YAML syntax; has no ': ', ' #', or brackets.
_PLAIN = re.compile(r"[A-Za-z0-9/_.][A-Za-z0-9/_.+=@%, '\"-]*")


def _scalar(text: str) -> str:
    """``text`` as a YAML scalar: plain when it is safely plain, else a JSON string."""
    if _PLAIN.fullmatch(text) and not text.endswith(" "):
        return text
    # A JSON string is a valid YAML double-quoted scalar.
    return json.dumps(text, ensure_ascii=False)


# Plain words YAML 1.1 or 1.2 reads as a boolean or null.
_YAML_WORDS = frozenset({"y", "n", "yes", "no", "true", "false", "on", "off", "null"})
_NUMBER_LIKE_HEX = re.compile(r"[0-9]+(e[0-9]+)?")  # an integer, or a float in YAML 1.2


def _name(name: str) -> str:
    """An image name (``[a-z0-9][a-z0-9._-]*``) as a scalar that YAML reads as that text."""
    # Starting with a digit it could be a number (1e3, 0x1f, 1_000 in YAML 1.1).
    return json.dumps(name) if name[0].isdigit() or name in _YAML_WORDS else name


def _hex(value: str) -> str:
    return json.dumps(value) if _NUMBER_LIKE_HEX.fullmatch(value) else value


def session_template(image: Image, *, las_platform: str | None = None,
                     tee: TemplateTee | None = None,
                     vm: Mapping[str, str] | None = None) -> str:
    """The template text for ``image`` (its recorded measurement as mrenclaves); a sim
    template accepts ``las_platform``'s evidence (None: ``$LAS_PLATFORM``); a tdx or
    snp one pins the VM (``vm``'s values, else placeholders) and the workload."""
    if tee is None:
        tee = TemplateTee.SIM if image.mode == "sim" else TemplateTee.SGX
    if (tee is TemplateTee.SIM) != (image.mode == "sim"):
        raise InputError(f"image {image.name} was built for {image.mode} attestation; a {tee} "
                         "template needs " + ("--mode sim" if tee is TemplateTee.SIM
                                              else "--mode hardware"))
    command = _scalar(join_command(image.entrypoint))
    name, measured = _name(image.name), _hex(image.measurement)
    source = image.source
    environment: list[str] = []
    if source is not None and source.env:
        environment = ["     environment:"]
        for entry in source.env:
            key, _, value = entry.partition("=")
            if "$" in entry:
                # Filling the template would read it as a variable: leave it to the user.
                environment.append(f"        # {key}: not written, its value holds '$'")
                continue
            environment.append(f"        {_scalar(key)}: {_scalar(value)}")
    pwd = _scalar(source.working_dir) if source is not None else "/"
    origin = f" (from {source.reference}, {source.digest})" if source is not None else ""
    lines = [
        f"# Session template for the tdapp image {image.name}{origin}, written by tdapp build.",
        "# The client fills in the session name and the volume keys and tags.",
        "name: $SESSION",
        "digest: create",
        "",
        "services:",
        f"   - name: {SERVICE}",
        f"     image_name: {name}",
        *_program(tee, measured, vm or {}),
        f"     command: {command}",
        f"     pwd: {pwd}",
        *environment,
        "",
        "volumes:",
        f"   - name: {INPUT_VOLUME}",
        "     fspf_tag: $INPUT_FSPF_TAG",
        "     fspf_key: $INPUT_FSPF_KEY",
        f"   - name: {OUTPUT_VOLUME}",
        "     fspf_tag: $OUTPUT_FSPF_TAG",
        "     fspf_key: $OUTPUT_FSPF_KEY",
        "",
        "images:",
        f"   - name: {name}",
        f"     mrenclaves: [{measured}]",
        "     volumes:",
        f"        - name: {INPUT_VOLUME}",
        f"          path: {INPUT_PATH}",
        f"        - name: {OUTPUT_VOLUME}",
        f"          path: {OUTPUT_PATH}",
    ]
    lines += ["", "security:", "   attestation:"]
    if tee is not TemplateTee.SIM:
        lines.append("      mode: hardware")
    else:
        if las_platform is not None and not _PLATFORM.fullmatch(las_platform):
            raise InputError(f"{las_platform[:80]!r} is not a LAS platform id (64 hex)")
        lines += ["      # sim evidence protects nothing against this host's root: "
                  "development only",
                  "      mode: sim",
                  f"      platforms: [{las_platform or '$' + LAS_PLATFORM_VARIABLE}]"]
    return "\n".join(lines) + "\n"


def _program(tee: TemplateTee, measured: str, vm: Mapping[str, str]) -> list[str]:
    """What the service's code must be: its measurement, or a VM and the workload in it."""
    match tee:
        case TemplateTee.SIM | TemplateTee.SGX:
            return [f"     mrenclaves: [{measured}]"]
        case TemplateTee.TDX | TemplateTee.SNP:
            fields = VM_FIELDS[tee]
            values = {name: vm.get(name) or f"${variable}" for name, variable in fields.items()}
            first, *rest = fields
            pins = [f"{first}: [{values[first]}]", *(f"{name}: {values[name]}" for name in rest)]
            return ["     attestation:",
                    "        # the VM (firmware, kernel, initrd, root file system with tdapp)",
                    f"        - {tee}: {{{', '.join(pins)}}}",
                    "          # and the workload the runtime binds into the evidence",
                    f"          mrenclave: [{measured}]"]
        case unreachable:
            assert_never(unreachable)


def write_template(image: Image, target: Path, *, las_platform: str | None = None,
                   tee: TemplateTee | None = None, vm: Mapping[str, str] | None = None) -> None:
    """Write the template to ``target`` in one step (see :mod:`tdapp.core.atomic`)."""
    if target.is_dir():
        raise InputError(f"{target} is a folder; -o needs a file name")
    text = session_template(image, las_platform=las_platform, tee=tee, vm=vm)
    try:
        write_atomically(target, text.encode("utf-8"))
    except FileNotFoundError:
        raise InputError(f"cannot write {target}: its folder does not exist") from None

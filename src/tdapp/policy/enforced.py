"""What the CAS enforces of the session language: everything else is refused at creation.

The language (:mod:`tdapp.policy.model`) accepts all of SCONE's keys, so that
every published session parses and a mistake is reported where it is. A key the
CAS would then ignore is a promise nobody keeps: an owner who writes
``update_policy: ephemeral`` or ``mode: maa`` believes something holds that
does not. :data:`RULES` lists each such key with why it is refused; a session
that uses one is refused at creation or update (and by ``tdapp session check``
and ``encryptedpush`` before anything is sent) with the key's path and line.

This module decides only *whether* a parsed session is enforceable; it must
never change a session, and a key it lets through must be one the CAS or the
runtime acts on (docs/cas.md, "What the CAS enforces", names the test of each).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from tdapp.policy.errors import SessionError
from tdapp.policy.iexec_task import IEXEC_OUT, OUT, TASK_ID, iexec_task_of, task_id_is_valid
from tdapp.policy.model import Session, UpdatePolicy
from tdapp.policy.parse import line_of, parse_session_document
from tdapp.policy.reader import Path, format_path
from tdapp.policy.references import (
    ANY_KIND_FORMATS,
    FORMATS,
    Place,
    Reference,
    Rendering,
    formats_of,
    referable_texts,
    references_in,
    rendering_of,
    where_referenced,
)
from tdapp.policy.security import AttestationMode
from tdapp.policy.services import HOST_ENV_PREFIX
from tdapp.policy.values import PLACEHOLDER

KEPT: UpdatePolicy = "rollback_protected"  # what volume tags give: the only policy enforced
_HOST_ARGUMENT = re.compile(r"@@[0-9]")


@dataclass(frozen=True)
class Unenforced:
    """A key (by its path in the document) the CAS would not enforce, and why."""

    path: Path
    reason: str


Rule = Callable[[Session], Iterator[Unenforced]]


def _read_back(session: Session) -> Iterator[Unenforced]:
    if session.digest is not None and session.digest != "create":
        yield Unenforced(("digest",), "a digest is what a CAS shows when it reads a session "
                         "back; it pins nothing on submission: name the session an update "
                         "replaces with predecessor, or say digest: create")


def _placeholder_sections(session: Session) -> Iterator[Unenforced]:
    for path in session.delegated_sections():
        yield Unenforced(tuple(path.split(".")),
                         "a section given as a $$SCONE::…$$ placeholder cannot be enforced: "
                         "tdapp does not resolve placeholders; write the section out")


def _attestation(session: Session) -> Iterator[Unenforced]:
    attestation = session.security.attestation
    here: Path = ("security", "attestation")
    if attestation.mode is AttestationMode.MAA:
        yield Unenforced((*here, "mode"), "mode maa cannot be enforced: tdapp has no Microsoft "
                         "Azure Attestation verifier (use hardware, sim or none)")
    if "maa-managed-tcb" in attestation.tolerate:
        yield Unenforced((*here, "tolerate"), "maa-managed-tcb applies only to mode maa, "
                         "which tdapp cannot enforce")
    if attestation.trusted_scone_qe_pubkeys:
        yield Unenforced((*here, "trusted_scone_qe_pubkeys"), "SCONE quoting enclaves are not "
                         "used: tdapp verifies DCAP quotes up to Intel's root; remove the key")
    if attestation.one_time_password_shared_secret is not None:
        yield Unenforced((*here, "one_time_password_shared_secret"),
                         "one-time passwords are not checked by tdapp; remove the key")


def _security(session: Session) -> Iterator[Unenforced]:
    if session.security.service_access_token is not None:
        yield Unenforced(("security", "service_access_token"),
                         "service access tokens are not checked by tdapp; remove the key")
    if session.security.singleton_enclaves:
        yield Unenforced(("security", "singleton_enclaves"),
                         "singleton enclaves are not enforced by tdapp (several instances of "
                         "a service may run at once); remove the key")


def _services(session: Session) -> Iterator[Unenforced]:
    for index, service in enumerate(session.services):
        here: Path = ("services", index)
        if service.fspf_path is not None:
            yield Unenforced((*here, "fspf_path"), "a service's main FSPF is not supported: "
                             "mount the files as a volume of the service's image")
        if service.one_time_password_shared_secret is not None:
            yield Unenforced((*here, "one_time_password_shared_secret"),
                             "one-time passwords are not checked by tdapp; remove the key")
        for name in service.environment:
            if name.startswith(HOST_ENV_PREFIX):
                yield Unenforced((*here, "environment", name),
                                 "variables taken from the host are not supported: the "
                                 "host may not change a service's environment")
        for position, word in enumerate(service.argv()):
            if _HOST_ARGUMENT.search(word):
                yield Unenforced((*here, "command"), f"argument {position} takes a value "
                                 "from the host (@@N), which tdapp does not allow: the host "
                                 "may not change a service's command")


def _volumes(session: Session) -> Iterator[Unenforced]:
    for index, volume in enumerate(session.volumes):
        here: Path = ("volumes", index)
        if volume.auto_initialised:
            yield Unenforced((*here, "name"), "a volume without fspf_key and fspf_tag would be "
                             "initialised on first use, which tdapp does not do; make it "
                             "with tdapp volume create (encryptedpush does) and give both")
        if volume.update_policy != KEPT:
            yield Unenforced((*here, "update_policy"), _update_policy(volume.update_policy))


def _update_policy(policy: str) -> str:
    return (f"update_policy {policy} is not enforced: every change a run makes to a volume "
            f"is kept and rollback protected ({KEPT}, the default)")


def _images(session: Session) -> Iterator[Unenforced]:
    for index, image in enumerate(session.images):
        for position, mount in enumerate(image.volumes):
            if mount.update_policy != KEPT:
                yield Unenforced(("images", index, "volumes", position, "update_policy"),
                                 _update_policy(mount.update_policy))
        for position, injected in enumerate(image.injection_files):
            here: Path = ("images", index, "injection_files", position)
            if injected.content is None:
                yield Unenforced((*here, "path"), "an injection file without content would "
                                 "be read from the image, which tdapp does not do; give its "
                                 "content")


def _secrets(session: Session) -> Iterator[Unenforced]:
    for index, secret in enumerate(session.secrets):
        here: Path = ("secrets", index)
        if secret.import_akv is not None:
            yield Unenforced((*here, "import_akv"), "imports from Azure Key Vault cannot work "
                             "here: tdapp has no Azure AD credentials or vault client")
        elif secret.kind in _REFUSED_KINDS:
            yield Unenforced((*here, "kind"), _REFUSED_KINDS[secret.kind])
        for key, target in secret.references().items():
            named = session.secret(target)
            if named is not None and named.import_ is not None:
                yield Unenforced((*here, key), f"{key} {target!r} is imported: the CAS makes "
                                 "a certificate only from keys and CAs this session defines")
        if secret.kind == "config-fragment":
            for found in _texts(secret.value):
                for reference in references_in(found):
                    yield from _nested_reference(session, (*here, "value"), reference)


_REFUSED_KINDS = {
    "aad-token": "secrets of kind aad-token cannot work here: they are Azure AD tokens, "
                 "and tdapp has no Azure AD client",
    "pgp-key": "secrets of kind pgp-key are not made by tdapp: it has no well-kept OpenPGP "
               "library to make them with; give the key as a binary or ascii secret",
}


def _texts(value: object) -> Iterator[str]:
    """The strings inside a config fragment's value (where references may stand)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield str(key)
            yield from _texts(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _texts(item)


def _nested_reference(session: Session, path: Path,
                      reference: Reference) -> Iterator[Unenforced]:
    target = session.secret(reference.secret)
    if target is not None and (target.kind == "config-fragment" or target.import_ is not None):
        yield Unenforced(path, f"{reference.text}: a config fragment may reference only secrets "
                         "this session makes (not another fragment, not an imported secret)")
    else:
        yield from _reference(session, path, reference)


def _references(session: Session) -> Iterator[Unenforced]:
    for found in where_referenced(session):
        if found.place is Place.COMMAND:
            yield Unenforced(found.path, f"{found.reference.text} in a command: a command line "
                             "is public (every local user reads /proc/PID/cmdline); pass the "
                             "secret in the environment or an injected file")
        else:
            yield from _reference(session, found.path, found.reference,
                                  raw_allowed=found.place is Place.INJECTION_FILE)
    for path, _, text in referable_texts(session):
        known = {reference.text for reference in references_in(text)}
        for match in PLACEHOLDER.finditer(text):
            if match.group(0) not in known:
                yield Unenforced(path, f"{match.group(0)} is not a reference to a secret "
                                 "(a secret's name is letters, digits, _ and -)")


_IMPLICIT_CA = "session-ca-certificate"


def _reference(session: Session, path: Path, reference: Reference, *,
               raw_allowed: bool = False) -> Iterator[Unenforced]:
    secret = session.secret(reference.secret)
    if secret is None:
        implicit = (" (tdapp makes no implicit session CA: define a secret of kind session-ca "
                    "and reference it)" if reference.secret == _IMPLICIT_CA else "")
        yield Unenforced(path, f"{reference.text}: the session has no secret named "
                         f"{reference.secret!r}{implicit}")
        return
    if secret.kind is None:  # imported: its kind is the exporter's, checked when released
        if reference.format not in ANY_KIND_FORMATS:
            yield Unenforced(path, f"{reference.text}: no kind of secret has a format "
                             f"{reference.format!r}")
    elif secret.kind in FORMATS:
        rendering = rendering_of(secret.kind, reference.format)
        if rendering is None:
            shown = f"format {reference.format!r}" if reference.format else "bare form"
            yield Unenforced(path, f"{reference.text}: secrets of kind {secret.kind} have no "
                             f"{shown} (its formats: {formats_of(secret.kind)})")
        elif rendering is Rendering.RAW and not raw_allowed:
            yield Unenforced(path, f"{reference.text}: a binary secret's bare form is its "
                             "bytes, which only an injected file can hold; name a format "
                             "(:hex, :base64, :base32)")


def _iexec_tasks(session: Session) -> Iterator[Unenforced]:
    for index, service in enumerate(session.services):
        task = iexec_task_of(session, service)
        if task is None:
            continue
        here: Path = ("services", index, "environment")
        if not task_id_is_valid(service.environment.get(TASK_ID) or ""):
            yield Unenforced((*here, TASK_ID), "an iExec task id is 0x and 64 hex digits (its "
                             "result is signed for it)")
        volume = session.volume(task.volume) if task.volume is not None else None
        if task.out != IEXEC_OUT or volume is None or volume.import_ is not None:
            yield Unenforced((*here, OUT), f"{OUT} must be {IEXEC_OUT}, where the service's "
                             "image mounts a volume of this session (not an imported one): "
                             "the runtime seals the app's computed.json there")


RULES: tuple[Rule, ...] = (_read_back, _placeholder_sections, _attestation, _security, _services,
                           _volumes, _images, _secrets, _references, _iexec_tasks)


def unenforced(session: Session) -> list[Unenforced]:
    """Every key of ``session`` the CAS would not enforce, in document order of sections."""
    return [finding for rule in RULES for finding in rule(session)]


def parse_enforceable_session(text: str, *, source: str = "session") -> Session:
    """Parse ``text`` and refuse it, at the first key the CAS would not enforce, with
    that key's path and line (:class:`SessionError`)."""
    session, document = parse_session_document(text, source=source)
    findings = unenforced(session)
    if findings:
        first, others = findings[0], [format_path(f.path) for f in findings[1:]]
        detail = first.reason
        if others:
            shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more"
                                              if len(others) > 3 else "")
            detail += f" (tdapp would not enforce {shown} either)"
        raise SessionError(detail, source=source, line=line_of(document, first.path),
                           path=format_path(first.path))
    return session

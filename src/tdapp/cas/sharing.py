"""The CAS's trust decisions about sharing: exports, imports, and filling in references.

:class:`Sharing` owns the invariant that a secret or volume of one session reaches
an attested instance of another only while the exporter's *current* session
exports it to the importer (by name, optionally pinned to the importer's hash,
or to a namespace the importer is in), and, when the import pins the
exporter's hash, only while the exporter is still that revision. The
exporter's consent is its own session, changed only under its own
``access_policy``: an update that removes the export cuts the importer off at
its next attestation. An imported volume is released read-only: its tag is the
exporter's row, and only the exporter's own instances move it.

:meth:`Sharing.fill` replaces the ``$$SCONE::name:format$$`` references of a
service's environment, ``pwd`` and injected files (and inside config fragments)
with the values, for the configuration of one attested instance only. It
never writes a value anywhere but into that configuration, and never into a
message: refusals name the secret, the session and the reason.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn, TypeVar

from tdapp.cas.secret_values import SecretValue
from tdapp.cas.sessions import OpenedSession, SessionAuthority
from tdapp.cas.store import AuditEntry, Outcome, Store, StoredTag
from tdapp.errors import IntegrityError, RefusedError
from tdapp.policy.model import Session, Volume
from tdapp.policy.references import Reference, references_in
from tdapp.policy.secrets import ExportTarget, Secret

Exported = TypeVar("Exported", Secret, Volume)


@dataclass
class Grants:
    """What one attestation took from other sessions, for their audit logs once it succeeds."""

    exporter_audits: list[tuple[str, AuditEntry]] = field(default_factory=list)
    steps: list[AuditEntry] = field(default_factory=list)  # for the importer's log


@dataclass(frozen=True)
class SharedVolume:
    key: str  # the exporter's fspf_key (hex)
    tag: StoredTag  # the exporter's row, checked


class ImportRefused(RefusedError):
    """An import the exporter does not (or no longer) grant; its reason is for readers."""

    public = "an import of the session is not granted by its exporter"


def resolve_session_ref(base: str, ref: str) -> str:
    """``ref`` (a session name, ``./name`` or ``../name``) as seen from session ``base``."""
    if not ref.startswith(("./", "../")):
        return ref
    folder = base.split("/")[:-1]
    rest = ref
    if rest.startswith("./"):
        rest = rest[2:]
    while rest.startswith("../"):
        rest = rest[3:]
        if folder:
            folder.pop()
    return "/".join([*folder, rest])


def _exported_to(targets: tuple[ExportTarget, ...], exporter: str,
                 importer: OpenedSession) -> bool:
    for target in targets:
        if target.session is not None:
            if resolve_session_ref(exporter, target.session) != importer.session.name:
                continue
            if target.session_hash is not None and target.session_hash != importer.hash:
                continue
            return True
        if target.namespace is not None:
            namespace = resolve_session_ref(exporter, target.namespace)
            if importer.session.name.startswith(namespace + "/"):
                return True
    return False


class Sharing:
    def __init__(self, store: Store, sessions: SessionAuthority) -> None:
        self._store = store
        self._sessions = sessions

    # -- imports ----------------------------------------------------------------------

    def _exporter(self, importer: OpenedSession, ref: str, pinned: str | None,
                  what: str) -> OpenedSession:
        name = resolve_session_ref(importer.session.name, ref)
        exporter = self._sessions.opened(name)
        if exporter is None:
            raise ImportRefused(f"{what}: session {name!r} does not exist")
        if pinned is not None and pinned != exporter.hash:
            self._refuse(name, importer, what, f"the import pins hash {pinned}, but session "
                         f"{name!r} is now {exporter.hash}")
        return exporter

    def _exported(self, importer: OpenedSession, ref: str, pinned: str | None, what: str,
                  find: Callable[[Session], Exported | None]) -> tuple[OpenedSession, Exported]:
        """The exporter and its secret or volume, if it exports that to ``importer``."""
        exporter = self._exporter(importer, ref, pinned, what)
        name = exporter.session.name
        source = find(exporter.session)
        if source is None or not _exported_to(source.export, name, importer):
            self._refuse(name, importer, what, f"session {name!r} does not export it to "
                         "this session")
        return exporter, source

    def _refuse(self, exporter: str, importer: OpenedSession, what: str,
                reason: str) -> NoReturn:
        """Refuse an import, in the exporter's audit log too (the importer's log gets it
        with the attestation's refusal)."""
        self._store.record(exporter, "export", None, Outcome.REFUSED,
                           f"{what} for session {importer.session.name!r} (hash "
                           f"{importer.hash}): {reason}; not released")
        raise ImportRefused(f"{what}: {reason}")

    @staticmethod
    def _granted(grants: Grants, exporter: str, importer: OpenedSession, what: str,
                 released: str) -> None:
        grants.exporter_audits.append((exporter, AuditEntry(
            "export", Outcome.ACCEPTED, f"{released} released to an instance of session "
                                        f"{importer.session.name!r}")))
        grants.steps.append(AuditEntry("import", Outcome.ACCEPTED,
                                       f"{what} from session {exporter!r}"))

    def secret(self, importer: OpenedSession, secret: Secret, grants: Grants) -> SecretValue:
        """The value of an imported secret, if its exporter exports it to ``importer``."""
        imported = secret.import_
        assert imported is not None
        what = f"secret {secret.name!r} (its {imported.secret!r})"
        exporter, source = self._exported(importer, imported.session, imported.session_hash,
                                          what, lambda session: session.secret(imported.secret))
        name = exporter.session.name
        value = exporter.values.get(imported.secret)
        if source.import_ is not None or value is None:
            self._refuse(name, importer, what, f"session {name!r} holds no value of its own "
                         "for it (a secret is exported only by its maker)")
        if secret.kind is not None and secret.kind != value.kind:
            self._refuse(name, importer, what, f"the import says kind {secret.kind}, but "
                         f"session {name!r} exports a {value.kind} secret")
        self._granted(grants, name, importer, what, f"secret {imported.secret!r}")
        return value

    def volume(self, importer: OpenedSession, volume: Volume, grants: Grants) -> SharedVolume:
        """The key and current tag row of an imported volume, if its exporter exports it."""
        imported = volume.import_
        assert imported is not None
        what = f"volume {volume.name!r} (its {imported.volume!r})"
        exporter, source = self._exported(importer, imported.session, imported.session_hash,
                                          what, lambda session: session.volume(imported.volume))
        name = exporter.session.name
        row = self._store.volume_tag(name, imported.volume)
        if source.fspf_key is None or row is None:
            self._refuse(name, importer, what, f"session {name!r} holds no key or tag for it")
        checked = self._sessions.records.check_tag(row)  # IntegrityError: not released
        self._granted(grants, name, importer, what,
                      f"volume {imported.volume!r} (tag {checked.tag}, read-only)")
        return SharedVolume(source.fspf_key, checked)

    # -- references -------------------------------------------------------------------

    def fillers(self, opened: OpenedSession, grants: Grants
                ) -> tuple[Callable[[str], str], Callable[[str], bytes]]:
        """Two functions that fill in the references of a text for this session's instance:
        one for text (environment, ``pwd``), one for an injected file's bytes (where a binary
        secret's bare form is its raw bytes).

        Each secret is looked up (and an import checked) once per attestation.
        """
        cache: dict[str, SecretValue] = {}

        def value_of(name: str) -> SecretValue:
            if name not in cache:
                secret = opened.session.secret(name)
                if secret is None:  # refused at creation: a stored session changed?
                    raise IntegrityError(f"the session references secret {name!r}, "
                                         "which it does not define")
                if secret.import_ is not None:
                    cache[name] = self.secret(opened, secret, grants)
                elif name in opened.values:
                    cache[name] = opened.values[name]
                else:
                    raise IntegrityError(f"the CAS holds no value for secret {name!r}: the "
                                         "session's record was changed outside the CAS")
            return cache[name]

        def render(reference: Reference) -> str:
            value = value_of(reference.secret)
            if value.kind == "config-fragment" and not reference.format:
                return _filled_fragment(value, render)
            return value.render(reference.format)

        def fill(text: str) -> str:
            return _replace_all(text, references_in(text), render)

        def fill_file(text: str) -> bytes:
            found = references_in(text)
            parts, position = [], 0
            for reference in found:
                start = text.index(reference.text, position)
                value = value_of(reference.secret)
                parts += [text[position:start].encode("utf-8"),
                          render(reference).encode("utf-8") if value.kind == "config-fragment"
                          else value.render_bytes(reference.format)]
                position = start + len(reference.text)
            parts.append(text[position:].encode("utf-8"))
            return b"".join(parts)

        return fill, fill_file


def _replace_all(text: str, found: list[Reference], render: Callable[[Reference], str]) -> str:
    """``text`` with each reference replaced once, left to right (a value that itself holds
    ``$$SCONE::…$$`` is never filled in again)."""
    if not found:
        return text
    parts: list[str] = []
    position = 0
    for reference in found:
        start = text.index(reference.text, position)
        parts += [text[position:start], render(reference)]
        position = start + len(reference.text)
    parts.append(text[position:])
    return "".join(parts)


def _filled_fragment(value: SecretValue, render: Callable[[Reference], str]) -> str:
    """A config fragment as compact JSON, with the references in its strings filled in."""
    def walk(item: Any) -> Any:
        if isinstance(item, str):
            return _replace_all(item, references_in(item), render)
        if isinstance(item, list):
            return [walk(element) for element in item]
        if isinstance(item, dict):
            return {walk(key): walk(element) for key, element in item.items()}
        return item
    return json.dumps(walk(json.loads(value.data)), separators=(",", ":"), sort_keys=True)

"""Sharing between parties, from the client: datasets, exports, and output keys.

- :func:`push_dataset`: a data owner seals a folder as one volume, creates a
  session that holds only it (readable and changeable by the owner alone) and
  uploads it; its key stays in the owner's KEYS folder (``datasets/``).
- :func:`with_export` / :func:`without_export`: a session's draft with an
  export of one of its secrets or volumes added or removed (the update goes to
  the CAS under the session's own ``access_policy``, like any other).
- :func:`write_output_key`: the one key a requester needs to decrypt a run's
  output, in a file of its own, so that sharing results never means sharing
  the input keys.

Nothing here decides who gets what: the CAS does (:mod:`tdapp.cas.sharing`).
Keys are written only into the KEYS folder, mode 0600, never over a file.
"""

from __future__ import annotations

import json
import re
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tdapp.client.cas_client import CasClient
from tdapp.client.session_files import OUTPUT_VOLUME
from tdapp.core.address import Address
from tdapp.core.atomic import WriteMode, write_atomically
from tdapp.errors import ConflictError, InputError, UsageError
from tdapp.policy.emit import dump_yaml
from tdapp.policy.enforced import parse_enforceable_session
from tdapp.tls import fingerprint
from tdapp.volume import Volume, VolumeKey
from tdapp.volume.bundle import pack

DATASETS_DIR = "datasets"
OUTPUT_KEYS_DIR = "output-keys"
_HASH = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class ExportTo:
    """``SESSION`` or ``SESSION@HASH``: who an export is for (pinned to a hash, or not)."""

    session: str
    session_hash: str | None = None

    @classmethod
    def parse(cls, text: str) -> ExportTo:
        session, at, digest = text.partition("@")
        if not session or (at and not _HASH.fullmatch(digest)):
            raise UsageError(f"{text!r}: expected SESSION or SESSION@HASH (64 hex characters)")
        return cls(session, digest if at else None)

    def as_target(self) -> dict[str, str]:
        target = {"session": self.session}
        if self.session_hash is not None:
            target["session_hash"] = self.session_hash
        return target


@dataclass(frozen=True)
class DatasetPush:
    session: str
    volume: str
    hash: str
    url: str
    keys_file: Path


def push_dataset(*, inputs: Path, volume: str, conf: Path, cas: Address, push: str,
                 exports: tuple[ExportTo, ...]) -> DatasetPush:
    """Seal ``inputs`` as volume ``volume``, create its session, upload the bundle."""
    from tdapp.transfer import upload

    if not inputs.is_dir():
        raise InputError(f"inputs folder {inputs} "
                         f"{'is not a folder' if inputs.exists() else 'does not exist'}")
    folder = conf / DATASETS_DIR
    _ready(folder)
    name = f"tdapp-dataset-{secrets.token_hex(16)}"
    key = VolumeKey.generate()
    with tempfile.TemporaryDirectory(prefix="tdapp-dataset-") as work:
        sealed = Volume.create(Path(work) / volume, key, source=inputs)
        document = {
            "name": name, "version": "0.3",
            "access_policy": {"read": ["CREATOR"], "update": ["CREATOR"]},
            "volumes": [{"name": volume, "fspf_key": key.hex(), "fspf_tag": sealed.tag.hex(),
                         **({"export": [e.as_target() for e in exports]} if exports else {})}],
        }
        text = dump_yaml(document)
        parse_enforceable_session(text, source="the dataset's session")
        client = CasClient.connect(cas)
        created = client.request("POST", "/v1/sessions", text.encode())
        bundle = Path(work) / "dataset.zip"
        pack({volume: Path(work) / volume}, bundle)
        url = upload(bundle, push)
    keys_file = folder / f"{name}.json"
    _keep(keys_file, {"session": name, "cas": str(cas),
                      "cas_fingerprint": fingerprint(client.pinned),
                      "session_hash": created.get("hash"), "url": url,
                      "volumes": {volume: {"key": key.hex(), "tag": sealed.tag.hex()}}})
    return DatasetPush(name, volume, str(created.get("hash")), url, keys_file)


def write_output_key(conf: Path, state: dict[str, Any]) -> Path:
    """Keep the output volume's key of a pushed session alone in ``output-keys/NAME.json``.

    The file is a session state file that holds no other key, so ``tdapp decrypt
    --key FILE`` works with it and nothing else needs to be shared.
    """
    output = state["volumes"][OUTPUT_VOLUME]
    document: dict[str, Any] = {key: state[key] for key in
                                ("session", "service", "cas", "cas_fingerprint") if key in state}
    document["volumes"] = {OUTPUT_VOLUME: {"key": output["key"]}}
    folder = conf / OUTPUT_KEYS_DIR
    _ready(folder)
    path = folder / f"{state['session']}.json"
    _keep(path, document)
    return path


def with_export(content: dict[str, Any], section: str, item: str,
                target: ExportTo) -> dict[str, Any]:
    """``content`` (a session's canonical form) with ``target`` added to the export of its
    secret or volume ``item`` (``section`` is "secrets" or "volumes")."""
    entry = _entry(content, section, item)
    exports = [e for e in _exports(entry) if e.get("session") != target.session]
    entry["export"] = [*exports, target.as_target()]
    return content


def without_export(content: dict[str, Any], section: str, item: str,
                   session: str) -> dict[str, Any]:
    """``content`` with every export of ``item`` to ``session`` removed."""
    entry = _entry(content, section, item)
    exports = _exports(entry)
    kept = [e for e in exports if e.get("session") != session]
    if len(kept) == len(exports):
        raise InputError(f"{section[:-1]} {item!r} is not exported to session {session!r}")
    if kept:
        entry["export"] = kept
    else:
        entry.pop("export", None)
    return content


def _entry(content: dict[str, Any], section: str, item: str) -> dict[str, Any]:
    for entry in content.get(section, []):
        if isinstance(entry, dict) and entry.get("name") == item:
            return entry
    raise InputError(f"session {content.get('name')!r} has no {section[:-1]} {item!r}")


def _exports(entry: dict[str, Any]) -> list[dict[str, Any]]:
    value = entry.get("export") or []
    return [dict(e) for e in (value if isinstance(value, list) else [value])]


def _ready(folder: Path) -> None:
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(f"cannot create {folder}: {error.strerror}") from None


def _keep(path: Path, document: dict[str, Any]) -> None:
    try:
        write_atomically(path, json.dumps(document, indent=2).encode(),
                         mode=WriteMode.CREATE_ONLY, permissions=0o600)
    except FileExistsError:
        raise ConflictError(f"{path} already exists; keys are never replaced") from None
    except OSError as error:
        raise InputError(f"cannot write {path}: {error.strerror}") from None

"""The KEYS folder: one state file per session, holding that session's volume keys.

Each ``encryptedpush`` writes ``sessions/<session>.json`` (mode 0600) once,
create-only and atomically, so no push ever replaces another session's keys
and a crash never leaves half a file; ``tdapp session push`` later replaces
the file's tags and URL only, with the same keys. ``tdapp-session.json`` next to it is a
copy of the latest session, kept for tools that read the single file of older
versions; a push replaces it only once the session it holds is also kept under
``sessions/`` (a folder from an older version has it migrated first, and one
that cannot be read is never replaced).

Every state file is checked on the way in: a broken, truncated or foreign file
is one clear :class:`~tdapp.errors.InputError` naming it. Must never write a
key outside the KEYS folder, readable by others, or over an existing session.
"""

from __future__ import annotations

import hmac
import json
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tdapp.core.address import Address
from tdapp.core.atomic import WriteMode, write_atomically
from tdapp.errors import ConflictError, InputError, UsageError
from tdapp.volume import VolumeKey

INPUT_VOLUME = "encrypted-input-files"
OUTPUT_VOLUME = "encrypted-output-files"
SERVICE = "application"
STATE_FILE = "tdapp-session.json"
SESSIONS_DIR = "sessions"
MAX_STATE_BYTES = 1 << 20
_SESSION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_FINGERPRINT = re.compile(r"[0-9a-f]{64}")
_KEEP_IT = "it may hold a session's keys, so it is neither replaced nor ignored: move it aside"


@dataclass(frozen=True)
class SessionState:
    """What ``decrypt`` needs from one session's state file, checked when read."""

    path: Path
    name: str
    cas: Address
    cas_fingerprint: str
    output_key: VolumeKey = field(repr=False)
    document: dict[str, Any] = field(repr=False)


class KeysFolder:
    """The KEYS folder of one user: the per-session state files and the latest copy."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.sessions = root / SESSIONS_DIR
        self.latest = root / STATE_FILE

    # -- writing (encryptedpush) ------------------------------------------------------

    def prepare_for_push(self) -> None:
        """Make sure the keys of a new session can be kept; migrate an older folder's file."""
        for folder in (self.root, self.sessions):
            if folder.exists() and not folder.is_dir():
                raise InputError(f"{folder} is not a folder; it is where session keys are kept")
            try:
                folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            except OSError as error:
                raise InputError(f"cannot create {folder}: {error.strerror}") from None
            if not os.access(folder, os.W_OK | os.X_OK):
                raise InputError(f"{folder} is not writable; session keys could not be kept")
        if not os.path.lexists(self.latest):
            return
        try:
            # One read: the bytes kept below are exactly the ones checked.
            data = _read_small_file(self.latest)
            latest = _parse(self.latest, data, None)
        except InputError as error:
            raise InputError(f"{error.message}; {_KEEP_IT}") from None
        kept = self._path_for(latest.name)
        if not os.path.lexists(kept):
            try:
                write_atomically(kept, data, mode=WriteMode.CREATE_ONLY, permissions=0o600)
                return
            except FileExistsError:
                pass  # a push running at the same time kept it first: check it is the same
            except OSError as error:
                raise InputError(f"cannot write {kept}: {error.strerror}") from None
        if self._load(kept, expected_name=latest.name).document != latest.document:
            raise InputError(f"{self.latest} and {kept} hold different states of session "
                             f"{latest.name}; keep the right one and move the other aside")

    def check_new_name(self, name: str) -> None:
        """Refuse, before anything is created, a session whose keys this folder cannot keep:
        a name it cannot hold, or one it holds already (keys are never replaced)."""
        if not _SESSION_NAME.fullmatch(name):
            raise InputError(f"session name {name!r} cannot name a state file in {self.root}: "
                             "use letters, digits, '.', '_' and '-' (no '/')")
        if os.path.lexists(self._path_for(name)):
            raise ConflictError(f"{self._path_for(name)} already exists: this folder holds "
                                f"the keys of a session {name} already; push new inputs into "
                                f"it with: tdapp session push {name}, or name another session")

    def save(self, document: dict[str, Any]) -> Path:
        """Keep a new session's state: its own file first, then the latest copy."""
        name = str(document["session"])
        data = json.dumps(document, indent=2).encode()
        path = self._path_for(name)
        try:
            write_atomically(path, data, mode=WriteMode.CREATE_ONLY, permissions=0o600)
        except FileExistsError:
            raise ConflictError(f"{path} already exists; a session's keys are never "
                                "replaced") from None
        except OSError as error:
            raise InputError(f"cannot write {path}: {error.strerror}") from None
        try:
            write_atomically(self.latest, data, mode=WriteMode.REPLACE, permissions=0o600)
        except OSError as error:
            raise InputError(f"session {name} is kept in {path}, but {self.latest} could not "
                             f"be updated: {error.strerror}") from None
        return path

    def replace(self, document: dict[str, Any]) -> Path:
        """Keep a later state of a session kept here (new tags and URL after
        ``tdapp session push``); refused unless every volume key is the one kept."""
        name = str(document["session"])
        kept = self.named(name).document.get("volumes", {})
        given = document.get("volumes", {})
        if set(kept) != set(given) or any(
                not hmac.compare_digest(str(kept[v].get("key", "")).encode(),
                                        str(given[v].get("key", "")).encode()) for v in kept):
            raise ConflictError(f"the new state of session {name} holds other keys than "
                                f"{self._path_for(name)}; a session's keys are never replaced")
        data = json.dumps(document, indent=2).encode()
        path = self._path_for(name)
        for target in (path, self.latest):
            try:
                write_atomically(target, data, mode=WriteMode.REPLACE, permissions=0o600)
            except OSError as error:
                raise InputError(f"cannot write {target}: {error.strerror}") from None
        return path

    # -- reading (decrypt) ------------------------------------------------------------

    def all_sessions(self) -> list[SessionState]:
        """Every session kept here, each once (its own file wins over the latest copy)."""
        self._require_root()
        found: dict[str, SessionState] = {}
        if os.path.lexists(self.sessions):
            if not self.sessions.is_dir():
                raise InputError(f"{self.sessions} is not a folder")
            try:
                paths = sorted(self.sessions.glob("*.json"))
            except OSError as error:
                raise InputError(f"cannot list {self.sessions}: {error.strerror}") from None
            for path in paths:
                if not path.name.startswith("."):
                    state = self._load(path, expected_name=path.name.removesuffix(".json"))
                    found[state.name] = state
        if os.path.lexists(self.latest):
            latest = self._load(self.latest)
            found.setdefault(latest.name, latest)
        return list(found.values())

    def named(self, name: str) -> SessionState:
        """The session called ``name``, from its own file or (older folders) the latest copy."""
        if not _SESSION_NAME.fullmatch(name):
            raise UsageError(f"{name!r} is not a session name")
        self._require_root()
        path = self._path_for(name)
        if os.path.lexists(path):
            return self._load(path, expected_name=name)
        if os.path.lexists(self.latest):
            latest = self._load(self.latest)
            if latest.name == name:
                return latest
        names = sorted(state.name for state in self.all_sessions())
        shown = ", ".join(names[:5]) + (", …" if len(names) > 5 else "")
        raise InputError(f"{self.root} holds no session {name}"
                         + (f" (it holds {shown})" if names else ""))

    def _require_root(self) -> None:
        if not self.root.is_dir():
            raise InputError(f"{self.root} "
                             f"{'is not a folder' if self.root.exists() else 'does not exist'}; "
                             "run tdapp encryptedpush first")

    def _path_for(self, name: str) -> Path:
        return self.sessions / f"{name}.json"

    def _load(self, path: Path, *, expected_name: str | None = None) -> SessionState:
        return _parse(path, _read_small_file(path), expected_name)


def load_state_file(path: Path) -> SessionState:
    """One state file read on its own (an output key file holds only the output key)."""
    return _parse(path, _read_small_file(path), None)


def _read_small_file(path: Path) -> bytes:
    """A state file's bytes, refusing a folder, a FIFO or a device without blocking."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise InputError(f"{path} does not exist; run tdapp encryptedpush first") from None
    except OSError as error:
        raise InputError(f"cannot read {path}: {error.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise InputError(f"{path} is not a regular file")
        chunks: list[bytes] = []
        size = 0
        while size <= MAX_STATE_BYTES and (chunk := os.read(fd, 1 << 16)):
            chunks.append(chunk)
            size += len(chunk)
    except OSError as error:
        raise InputError(f"cannot read {path}: {error.strerror}") from None
    finally:
        os.close(fd)
    if size > MAX_STATE_BYTES:
        raise InputError(f"{path} is larger than {MAX_STATE_BYTES} bytes; "
                         "not a session state file")
    return b"".join(chunks)


def _parse(path: Path, data: bytes, expected_name: str | None) -> SessionState:
    def unusable(reason: str) -> InputError:
        return InputError(f"{path} is not a usable session state file: {reason}")

    try:
        document = json.loads(data)
    except (ValueError, RecursionError):
        raise unusable("it is not JSON") from None
    if not isinstance(document, dict):
        raise unusable("it is not a JSON object")

    def text(record: dict[str, Any], key: str, where: str = "") -> str:
        value = record.get(key)
        if not isinstance(value, str):
            raise unusable(f"{where}{key!r} is {'missing' if value is None else 'not text'}")
        return value

    name = text(document, "session")
    if not _SESSION_NAME.fullmatch(name):
        raise unusable(f"{name!r} is not a session name")
    if expected_name is not None and name != expected_name:
        raise unusable(f"it holds session {name}, not {expected_name}")
    cas_fingerprint = text(document, "cas_fingerprint")
    if not _FINGERPRINT.fullmatch(cas_fingerprint):
        raise unusable("'cas_fingerprint' is not a SHA-256 fingerprint")
    volumes = document.get("volumes")
    output = volumes.get(OUTPUT_VOLUME) if isinstance(volumes, dict) else None
    if not isinstance(output, dict):
        raise unusable(f"it has no {OUTPUT_VOLUME} volume")
    try:
        cas = Address.parse(text(document, "cas"))
        key = VolumeKey.from_hex(text(output, "key", f"{OUTPUT_VOLUME} "))
    except UsageError as error:
        raise unusable(error.message) from None
    return SessionState(path, name, cas, cas_fingerprint, key, document)

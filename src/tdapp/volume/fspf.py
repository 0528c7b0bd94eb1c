"""The file system protection file (FSPF): a volume's sealed table of contents.

This module owns the FSPF byte format (docs/volume-format.md) and the one
invariant that matters most: a :class:`Manifest` only comes out of
:func:`open_fspf` after the key was confirmed, the stored tag equalled the
expected tag, and the AEAD authenticated every byte. It must never return
partly checked content or put key material in an error message. A manifest
that authenticated but is malformed (duplicate JSON keys, deep nesting, unknown
fields, bad names, a path that is both a file and a folder, a region that does
not match the path, one object listed twice) is refused as a whole with one
line. Setuid, setgid and sticky bits are dropped when a manifest is read
(:data:`PERMISSION_BITS`), so none can come out of any volume.
"""

from __future__ import annotations

import hmac
import json
import os
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from tdapp.core.canonical import canonical_json
from tdapp.errors import InputError, IntegrityError, WrongKeyError
from tdapp.volume.keys import VolumeKey, VolumeTag
from tdapp.volume.paths import check_stored_path, escape_path, find_clash
from tdapp.volume.regions import RegionKind, RegionMap

MAGIC = b"TDAPPVOL"
FORMAT_VERSION = 1
_HEADER = struct.Struct(">8sHH16s32s")
HEADER_SIZE = _HEADER.size  # 60
TAG_SIZE = 16
MAX_FSPF_SIZE = 256 * 1024 * 1024
OBJECT_ID_SIZE = 16
FILE_KEY_SIZE = 32
MIN_CHUNK_SIZE = 16
MAX_CHUNK_SIZE = 64 * 1024 * 1024
DEFAULT_CHUNK_SIZE = 64 * 1024
PERMISSION_BITS = 0o777
"""The mode bits a volume keeps: setuid, setgid and sticky never survive sealing or extraction."""

_MANIFEST_FIELDS = frozenset({"chunk_size", "generation", "regions", "files", "dirs"})
_FILE_FIELDS = frozenset({"region", "size", "mode", "mtime_ns", "object", "key"})
_DIR_FIELDS = frozenset({"mode", "mtime_ns"})
_LOWER_HEX = re.compile("[0-9a-f]+")

_INFO_KEY_CHECK = b"tdapp/v1 key-check"
_INFO_FSPF = b"tdapp/v1 fspf"
_ZERO_NONCE = bytes(12)


@dataclass(frozen=True)
class FileEntry:
    """One protected file: where its sealed content lives and how to open it."""

    region: RegionKind
    size: int
    mode: int
    mtime_ns: int
    object_id: bytes
    file_key: bytes = field(repr=False)

    @property
    def object_name(self) -> str:
        return self.object_id.hex()


@dataclass(frozen=True)
class DirEntry:
    mode: int
    mtime_ns: int


@dataclass(frozen=True)
class Manifest:
    """The authenticated content of an FSPF."""

    chunk_size: int
    generation: int
    regions: RegionMap
    files: Mapping[str, FileEntry]
    dirs: Mapping[str, DirEntry]

    def to_bytes(self) -> bytes:
        document = {
            "chunk_size": self.chunk_size,
            "generation": self.generation,
            "regions": [[prefix, kind.value] for prefix, kind in self.regions.as_list()],
            "files": {
                path: {
                    "region": entry.region.value,
                    "size": entry.size,
                    "mode": entry.mode & PERMISSION_BITS,
                    "mtime_ns": entry.mtime_ns,
                    "object": entry.object_id.hex(),
                    "key": entry.file_key.hex(),
                }
                for path, entry in sorted(self.files.items())
            },
            "dirs": {
                path: {"mode": entry.mode & PERMISSION_BITS, "mtime_ns": entry.mtime_ns}
                for path, entry in sorted(self.dirs.items())
            },
        }
        return canonical_json(document)

    @classmethod
    def from_bytes(cls, data: bytes) -> Manifest:
        """Parse and validate manifest bytes; a refusal names what is wrong in one line."""
        try:
            document = json.loads(data.decode("utf-8"), object_pairs_hook=_unique_keys,
                                  parse_constant=_no_constant)
            return _manifest_from_document(document)
        except RecursionError:
            raise InputError("volume.fspf content is not a valid manifest: "
                             "it is nested too deeply") from None
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError,
                InputError) as exc:
            reason = exc.message if isinstance(exc, InputError) else str(exc)
            raise InputError(f"volume.fspf content is not a valid manifest: "
                             f"{escape_path(reason)}") from None


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for name, value in pairs:
        if name in result:
            raise ValueError(f"key {name!r} appears twice in one object")
        result[name] = value
    return result


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number")


def _record(value: Any, fields: frozenset[str], what: str) -> Mapping[str, Any]:
    """A JSON object holding exactly ``fields``."""
    if not isinstance(value, dict):
        raise TypeError(f"{what} is not an object")
    if value.keys() != fields:
        odd = sorted(value.keys() ^ fields)[0]
        state = "is missing" if odd in fields else "is not a known field"
        raise ValueError(f"{what}: {odd!r} {state}")
    return value


def _int_field(record: Mapping[str, Any], name: str, low: int, high: int) -> int:
    value = record[name]
    if type(value) is not int or not low <= value <= high:
        raise ValueError(f"{name} {value!r:.40} is not an integer in {low}..{high}")
    return value


def _hex_field(record: Mapping[str, Any], name: str, size: int) -> bytes:
    value = record[name]
    if not isinstance(value, str) or not _LOWER_HEX.fullmatch(value) or len(value) != 2 * size:
        raise ValueError(f"{name} must be {2 * size} lower-case hex characters")
    return bytes.fromhex(value)


def _mode_field(record: Mapping[str, Any]) -> int:
    # An older or careless writer may have recorded setuid, setgid or sticky bits:
    # they are read, and dropped, so no extraction (often as root) can restore them.
    return _int_field(record, "mode", 0, 0o7777) & PERMISSION_BITS


def _regions(value: Any) -> RegionMap:
    if not isinstance(value, list):
        raise TypeError("regions is not a list")
    pairs: list[tuple[str, RegionKind]] = []
    seen: set[str] = set()
    for item in value:
        if not isinstance(item, list) or len(item) != 2 or not all(
                isinstance(part, str) for part in item):
            raise TypeError("a region is not a [prefix, kind] pair of strings")
        prefix, kind = item
        if prefix:
            check_stored_path(prefix)
        if prefix in seen:
            raise ValueError(f"region {prefix!r} is listed twice")
        seen.add(prefix)
        pairs.append((prefix, RegionKind(kind)))
    return RegionMap.build(pairs)


def _manifest_from_document(document: Any) -> Manifest:
    document = _record(document, _MANIFEST_FIELDS, "the manifest")
    chunk_size = _int_field(document, "chunk_size", MIN_CHUNK_SIZE, MAX_CHUNK_SIZE)
    generation = _int_field(document, "generation", 0, 2**63 - 1)
    regions = _regions(document["regions"])
    if not isinstance(document["files"], dict) or not isinstance(document["dirs"], dict):
        raise TypeError("files and dirs must be objects")
    files: dict[str, FileEntry] = {}
    objects: set[bytes] = set()
    for path, value in document["files"].items():
        check_stored_path(path)
        record = _record(value, _FILE_FIELDS, f"file {path!r}")
        region = RegionKind(record["region"])
        if not region.protected or region is not regions.kind_of(path):
            raise ValueError(f"file {path!r} is listed as {region.value} but lies in a "
                             f"{regions.kind_of(path).value} region")
        entry = FileEntry(
            region=region,
            size=_int_field(record, "size", 0, 2**63 - 1),
            mode=_mode_field(record),
            mtime_ns=_int_field(record, "mtime_ns", -(2**63), 2**63 - 1),
            object_id=_hex_field(record, "object", OBJECT_ID_SIZE),
            file_key=_hex_field(record, "key", FILE_KEY_SIZE),
        )
        if entry.object_id in objects:
            # Replacing one of the files would delete the other's content.
            raise ValueError(f"object {entry.object_name} is listed for two files")
        objects.add(entry.object_id)
        files[path] = entry
    dirs: dict[str, DirEntry] = {}
    for path, value in document["dirs"].items():
        check_stored_path(path)
        record = _record(value, _DIR_FIELDS, f"folder {path!r}")
        if not regions.kind_of(path).protected:
            raise ValueError(f"folder {path!r} is listed but lies in a not-protected region")
        dirs[path] = DirEntry(mode=_mode_field(record),
                              mtime_ns=_int_field(record, "mtime_ns", -(2**63), 2**63 - 1))
    clash = find_clash(files, dirs)
    if clash is not None:
        raise ValueError(f"{clash!r} is listed both as a file and as a folder")
    return Manifest(chunk_size, generation, regions, files, dirs)


def key_check(key: VolumeKey) -> bytes:
    """A 16-byte commitment to the key, so a wrong key is told apart from tampering."""
    return _hkdf(key, salt=None, info=_INFO_KEY_CHECK, length=16)


def _hkdf(key: VolumeKey, *, salt: bytes | None, info: bytes, length: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(key.raw)


def seal_fspf(manifest: Manifest, key: VolumeKey) -> tuple[bytes, VolumeTag]:
    """Serialize and seal a manifest; returns the FSPF bytes and the volume's new tag.

    Every seal draws a fresh salt, so the derived AEAD key is used exactly once
    and the all-zero nonce can never repeat under it.
    """
    return seal_manifest_bytes(manifest.to_bytes(), key)


def seal_manifest_bytes(plaintext: bytes, key: VolumeKey) -> tuple[bytes, VolumeTag]:
    """Seal manifest bytes as they are (readers validate them; writers use :func:`seal_fspf`)."""
    salt = os.urandom(32)
    header = _HEADER.pack(MAGIC, FORMAT_VERSION, 0, key_check(key), salt)
    aead = AESGCM(_hkdf(key, salt=salt, info=_INFO_FSPF, length=32))
    sealed = aead.encrypt(_ZERO_NONCE, plaintext, header)
    return header + sealed, VolumeTag(sealed[-TAG_SIZE:])


def read_tag(data: bytes) -> VolumeTag:
    """The tag stored in FSPF bytes, without checking anything else."""
    _parse_header(data)
    return VolumeTag(data[-TAG_SIZE:])


def _parse_header(data: bytes) -> tuple[bytes, bytes, bytes]:
    if len(data) < HEADER_SIZE + TAG_SIZE or not data.startswith(MAGIC):
        raise InputError("volume.fspf is not a tdapp volume file")
    _magic, version, reserved, stored_check, salt = _HEADER.unpack_from(data)
    if version != FORMAT_VERSION or reserved != 0:
        raise InputError(
            f"volume.fspf has format version {version}.{reserved}; "
            f"this tdapp reads version {FORMAT_VERSION}"
        )
    return data[:HEADER_SIZE], stored_check, salt


def open_fspf(data: bytes, key: VolumeKey, expected_tag: VolumeTag) -> Manifest:
    """Check and decrypt FSPF bytes; the only way to obtain a trusted Manifest."""
    header, stored_check, salt = _parse_header(data)
    if not hmac.compare_digest(stored_check, key_check(key)):
        raise WrongKeyError("wrong key: this key does not open the volume")
    stored_tag = VolumeTag(data[-TAG_SIZE:])
    if stored_tag != expected_tag:
        raise IntegrityError(
            f"tag mismatch (rollback or tampering): the volume has tag {stored_tag.hex()}, "
            f"expected {expected_tag.hex()}"
        )
    aead = AESGCM(_hkdf(key, salt=salt, info=_INFO_FSPF, length=32))
    try:
        plaintext = aead.decrypt(_ZERO_NONCE, data[HEADER_SIZE:], header)
    except InvalidTag:
        raise IntegrityError("volume.fspf failed authentication (tampering)") from None
    return Manifest.from_bytes(plaintext)


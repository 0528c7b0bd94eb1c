"""Attacks on bundle unpacking with crafted zip files: each is refused with one line naming
the member and the limit, before anything is written, and never as zipfile's own error.

``write_zip`` writes a zip by hand (local headers, central directory, end record) from
members whose stored bytes are given as they are, so a test can set any flag, any
declared size and a deflate stream of 1 GiB of zeros that takes 1 MB and no time to make.
"""

from __future__ import annotations

import os
import struct
import zipfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tdapp.errors import InputError
from tdapp.volume.bundle import BundleLimits, pack, unpack

_LOCAL = struct.Struct("<4s5H3L2H")
_CENTRAL = struct.Struct("<4s6H3L5H2L")
_END = struct.Struct("<4s4H2LH")
_REGULAR = 0o100644 << 16


@dataclass(frozen=True)
class RawMember:
    """A member exactly as stored: its bytes (compressed or not) and what it declares."""

    name: str
    stored: bytes
    crc: int
    size: int
    method: int = zipfile.ZIP_STORED
    flags: int = 0


def stored(name: str, data: bytes) -> RawMember:
    return RawMember(name, data, zlib.crc32(data), len(data))


def zeros(name: str, mebibytes: int) -> RawMember:
    """``mebibytes`` MiB of zeros, deflated: the same 1 KiB per MiB after a full flush."""
    block = bytes(1 << 20)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    piece = compressor.compress(block) + compressor.flush(zlib.Z_FULL_FLUSH)
    crc = 0
    for _ in range(mebibytes):
        crc = zlib.crc32(block, crc)
    return RawMember(name, piece * mebibytes + compressor.flush(), crc, mebibytes << 20,
                     zipfile.ZIP_DEFLATED)


def write_zip(path: Path, members: Iterable[RawMember]) -> None:
    central = bytearray()
    count = 0
    with path.open("wb") as out:
        for member in members:
            name = member.name.encode()
            offset = out.tell()
            out.write(_LOCAL.pack(b"PK\x03\x04", 20, member.flags, member.method, 0, 0x21,
                                  member.crc, len(member.stored), member.size, len(name), 0))
            out.write(name)
            out.write(member.stored)
            central += _CENTRAL.pack(b"PK\x01\x02", 20, 20, member.flags, member.method, 0,
                                     0x21, member.crc, len(member.stored), member.size,
                                     len(name), 0, 0, 0, 0, _REGULAR, offset) + name
            count += 1
        start = out.tell()
        out.write(central)
        out.write(_END.pack(b"PK\x05\x06", 0, 0, count, count, len(central), start, 0))


def files_under(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def refused(bundle: Path, target: Path, *named: str, wanted: set[str] | None = None,
            limits: BundleLimits | None = None) -> str:
    with pytest.raises(InputError) as raised:
        unpack(bundle, target, wanted, **({"limits": limits} if limits else {}))
    message = str(raised.value)
    assert "\n" not in message
    for part in named:
        assert part in message, message
    assert not target.exists() or files_under(target) == [], "something was written"
    return message


def test_a_zip_bomb_in_an_extra_folder_is_refused_before_anything_is_written(
        tmp_path: Path) -> None:
    bundle = tmp_path / "bomb.zip"
    write_zip(bundle, [stored("encrypted-input-files/volume.fspf", os.urandom(200)),
                       zeros("extra/zeros", 1024)])
    assert bundle.stat().st_size < 2 * 1024 * 1024  # 1 GiB of zeros in about 1 MB
    free_before = os.statvfs(tmp_path).f_bavail
    refused(bundle, tmp_path / "out", "'extra/zeros'", "100 times (the limit)",
            wanted={"encrypted-input-files"})
    # Nothing of the gibibyte reached the disk (a margin for unrelated writers).
    assert os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize > \
        free_before * os.statvfs(tmp_path).f_frsize - 64 * 1024 * 1024


def test_only_the_wanted_volumes_are_written(tmp_path: Path) -> None:
    for name in ("wanted", "extra"):
        (tmp_path / name / "objects").mkdir(parents=True)
        (tmp_path / name / "volume.fspf").write_bytes(os.urandom(64))
        (tmp_path / name / "objects" / "a").write_bytes(os.urandom(4096))
    pack({"wanted": tmp_path / "wanted", "extra": tmp_path / "extra"}, tmp_path / "b.zip")
    found = unpack(tmp_path / "b.zip", tmp_path / "out", {"wanted"})
    assert found == {"wanted": tmp_path / "out" / "wanted"}
    assert files_under(tmp_path / "out") == ["wanted/objects/a", "wanted/volume.fspf"]


def test_the_wanted_volumes_total_is_bounded(tmp_path: Path) -> None:
    bundle = tmp_path / "big.zip"
    write_zip(bundle, [stored(f"v/objects/{i}", os.urandom(40_000)) for i in range(3)])
    refused(bundle, tmp_path / "out", "more than 100000 bytes (the limit)", "'v/objects/2'",
            wanted={"v"}, limits=BundleLimits(total_bytes=100_000))


def test_members_are_counted_in_the_central_directory_even_when_the_end_record_lies(
        tmp_path: Path) -> None:
    bundle = tmp_path / "many.zip"
    write_zip(bundle, [stored(f"v/objects/{i}", b"") for i in range(500)])
    data = bytearray(bundle.read_bytes())
    end = data.rfind(b"PK\x05\x06")
    data[end + 8:end + 12] = struct.pack("<HH", 1, 1)  # "one member"
    bundle.write_bytes(bytes(data))
    refused(bundle, tmp_path / "out", "more than 100 members", wanted={"v"},
            limits=BundleLimits(members=100))


def test_a_zip_encrypted_member_is_a_clear_refusal(tmp_path: Path) -> None:
    bundle = tmp_path / "encrypted.zip"
    write_zip(bundle, [RawMember("v/volume.fspf", b"x" * 12 + b"secret", 0, 6, flags=0x1)])
    refused(bundle, tmp_path / "out", "'v/volume.fspf'", "zip-encrypted", wanted={"v"})


def test_a_folder_then_a_file_of_the_same_name_is_a_clear_refusal(tmp_path: Path) -> None:
    bundle = tmp_path / "clash.zip"
    write_zip(bundle, [stored("v/a/b", b"inner"), stored("v/a", b"outer")])
    refused(bundle, tmp_path / "out", "'v/a'", "both as a file and as a folder", wanted={"v"})


def test_a_member_larger_than_it_declares_is_refused(tmp_path: Path) -> None:
    bundle = tmp_path / "liar.zip"
    honest = zeros("v/objects/a", 4)
    write_zip(bundle, [RawMember(honest.name, honest.stored, honest.crc, 1024,
                                 zipfile.ZIP_DEFLATED)])
    with pytest.raises(InputError):
        unpack(bundle, tmp_path / "out", {"v"})
    out = tmp_path / "out" / "v" / "objects" / "a"
    assert not out.exists() or out.stat().st_size <= 1024

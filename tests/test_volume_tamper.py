"""Attacks on a stored volume: every one must be refused, for the right reason.

Each attack is run through ``tdapp volume verify`` and ``tdapp volume extract``; an
extraction that is refused must leave its output folder exactly as it was.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import CliResult, Made, MakeVolume, assert_error, snapshot, write_tree

from tdapp.errors import ConflictError, IntegrityError
from tdapp.volume import RegionKind, Volume, VolumeKey, VolumeTag

C = 64
STORED_CHUNK = C + 16
BIG = "docs/big.bin"  # 6 chunks: 5 full and one of 10 bytes
TWIN = "docs/twin.bin"  # same size as BIG
SIGNED = "auth/signed.txt"

FILES: dict[str, bytes | None] = {
    "a.txt": b"first file, extracted before the tampered one",
    SIGNED: bytes(range(256))[: 3 * C],
    BIG: os.urandom(5 * C + 10),
    TWIN: os.urandom(5 * C + 10),
    "empty": b"",
    "zz/last.txt": b"after the tampered file",
    "open/notes.txt": b"not protected",
    "void": None,
}
REGIONS = {"auth": RegionKind.AUTHENTICATED, "open": RegionKind.NOT_PROTECTED}
CliRunner = Callable[..., CliResult]


@pytest.fixture
def vol(make_volume: MakeVolume) -> Made:
    return make_volume(FILES, chunk_size=C, regions=REGIONS)


@pytest.fixture
def out_dir(tmp_path: Path) -> Path:
    """An output folder that already holds files, one of them in a folder the volume has."""
    return write_tree(tmp_path / "out", {"keep.txt": b"precious", "docs/mine.txt": b"mine"})


def refused(cli: CliRunner, command: str, made: Made, out: Path, code: int, fragment: str,
            *, key: VolumeKey | None = None, tag: VolumeTag | None = None) -> None:
    """Run ``command`` and check it is refused with ``fragment``, touching nothing."""
    key_hex = (key or made.key).hex()
    tag_hex = (tag or made.tag).hex()
    before = snapshot(out)
    if command == "verify":
        result = cli("volume", "verify", made.root, "--key", key_hex, "--tag", tag_hex)
    else:
        result = cli("volume", "extract", made.root, out, "--key", key_hex, "--tag", tag_hex)
    assert_error(result, code, fragment)
    assert result.out == ""
    assert snapshot(out) == before  # no partial file, no .tdapp-extract-* folder left
    assert made.key.hex() not in result.err


def flip(path: Path, offset: int, mask: int = 0x01) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= mask
    path.write_bytes(bytes(data))


COMMANDS = pytest.mark.parametrize("command", ["verify", "extract"])


def test_untampered_volume_is_accepted(vol: Made, out_dir: Path, cli: CliRunner) -> None:
    """The baseline the attacks start from: verify and extract succeed."""
    assert cli("volume", "verify", vol.root, *vol.key_args()).code == 0
    result = cli("volume", "extract", vol.root, out_dir, *vol.key_args())
    assert result.code == 0, result.err
    assert (out_dir / BIG).read_bytes() == FILES[BIG]
    assert (out_dir / "keep.txt").read_bytes() == b"precious"
    assert (out_dir / "docs" / "mine.txt").read_bytes() == b"mine"


# -- the FSPF ---------------------------------------------------------------------------

# (offset, expected reason, exit code); negative offsets count from the end of the FSPF.
FSPF_FLIPS = [
    pytest.param(0, "not a tdapp volume", 3, id="magic-first"),
    pytest.param(7, "not a tdapp volume", 3, id="magic-last"),
    pytest.param(8, "format version", 3, id="version-high"),
    pytest.param(9, "format version", 3, id="version-low"),
    pytest.param(10, "format version", 3, id="reserved-high"),
    pytest.param(11, "format version", 3, id="reserved-low"),
    pytest.param(12, "wrong key", 5, id="keycheck-first"),
    pytest.param(27, "wrong key", 5, id="keycheck-last"),
    pytest.param(28, "volume.fspf failed authentication", 4, id="salt-first"),
    pytest.param(59, "volume.fspf failed authentication", 4, id="salt-last"),
    pytest.param(60, "volume.fspf failed authentication", 4, id="body-first"),
    pytest.param("middle", "volume.fspf failed authentication", 4, id="body-middle"),
    pytest.param(-17, "volume.fspf failed authentication", 4, id="body-last"),
    pytest.param(-16, "tag mismatch (rollback or tampering)", 4, id="tag-first"),
    pytest.param(-9, "tag mismatch (rollback or tampering)", 4, id="tag-middle"),
    pytest.param(-1, "tag mismatch (rollback or tampering)", 4, id="tag-last"),
]
ACCEPTED_REASONS = ("tag mismatch", "failed authentication", "wrong key",
                    "not a tdapp volume", "format version")


@COMMANDS
@pytest.mark.parametrize(("offset", "reason", "code"), FSPF_FLIPS)
@pytest.mark.parametrize("mask", [0x01, 0x80])
def test_fspf_bit_flip(vol: Made, out_dir: Path, cli: CliRunner, command: str,
                       offset: int | str, reason: str, code: int, mask: int) -> None:
    fspf = vol.root / "volume.fspf"
    size = fspf.stat().st_size
    position = (60 + size - 16) // 2 if offset == "middle" else offset
    assert isinstance(position, int)
    flip(fspf, position, mask)
    assert any(accepted in reason for accepted in ACCEPTED_REASONS)
    refused(cli, command, vol, out_dir, code, reason)


@COMMANDS
def test_fspf_tampered_with_matching_tag(vol: Made, out_dir: Path, cli: CliRunner,
                                         command: str) -> None:
    """Changing the tag bytes and presenting the changed tag still fails authentication."""
    fspf = vol.root / "volume.fspf"
    flip(fspf, -1)
    forged = VolumeTag(fspf.read_bytes()[-16:])
    refused(cli, command, vol, out_dir, 4, "volume.fspf failed authentication", tag=forged)


@COMMANDS
@pytest.mark.parametrize("change", ["truncate", "extend", "header-only", "empty"])
def test_fspf_resized(vol: Made, out_dir: Path, cli: CliRunner, command: str,
                      change: str) -> None:
    fspf = vol.root / "volume.fspf"
    data = fspf.read_bytes()
    new, reason, code = {
        "truncate": (data[:-1], "tag mismatch", 4),
        "extend": (data + b"\0", "tag mismatch", 4),
        "header-only": (data[:60], "not a tdapp volume", 3),
        "empty": (b"", "not a tdapp volume", 3),
    }[change]
    fspf.write_bytes(new)
    refused(cli, command, vol, out_dir, code, reason)


@COMMANDS
def test_fspf_deleted(vol: Made, out_dir: Path, cli: CliRunner, command: str) -> None:
    (vol.root / "volume.fspf").unlink()
    refused(cli, command, vol, out_dir, 3, "is not a tdapp volume (no volume.fspf)")


# -- stored objects ---------------------------------------------------------------------


def _flip_first(made: Made) -> str:
    flip(made.object_path(BIG), 0)
    return f"chunk 0 of {BIG} failed authentication"


def _flip_chunk3_middle(made: Made) -> str:
    flip(made.object_path(BIG), 3 * STORED_CHUNK + STORED_CHUNK // 2)
    return f"chunk 3 of {BIG} failed authentication"


def _flip_last_tag_byte(made: Made) -> str:
    path = made.object_path(BIG)
    flip(path, path.stat().st_size - 1)
    return f"chunk 5 of {BIG} failed authentication"


def _flip_empty_file_tag(made: Made) -> str:
    flip(made.object_path("empty"), 15)
    return "chunk 0 of empty failed authentication"


def _flip_authenticated_payload(made: Made) -> str:
    path = made.object_path(SIGNED)
    assert path.read_bytes()[:C] == FILES[SIGNED][:C]  # payload stored in clear
    flip(path, STORED_CHUNK + 5)
    return f"chunk 1 of {SIGNED} failed authentication"


def _swap_chunks_1_and_2(made: Made) -> str:
    path = made.object_path(BIG)
    data = bytearray(path.read_bytes())
    one = data[STORED_CHUNK: 2 * STORED_CHUNK]
    two = data[2 * STORED_CHUNK: 3 * STORED_CHUNK]
    data[STORED_CHUNK: 3 * STORED_CHUNK] = two + one
    path.write_bytes(bytes(data))
    return f"chunk 1 of {BIG} failed authentication"


def _copy_chunk_from_other_file(made: Made) -> str:
    path = made.object_path(BIG)
    data = bytearray(path.read_bytes())
    other = made.object_path(TWIN).read_bytes()
    data[2 * STORED_CHUNK: 3 * STORED_CHUNK] = other[2 * STORED_CHUNK: 3 * STORED_CHUNK]
    path.write_bytes(bytes(data))
    return f"chunk 2 of {BIG} failed authentication"


def _truncate_one_byte(made: Made) -> str:
    path = made.object_path(BIG)
    os.truncate(path, path.stat().st_size - 1)
    return f"{BIG} was truncated"


def _truncate_one_chunk(made: Made) -> str:
    path = made.object_path(BIG)
    os.truncate(path, path.stat().st_size - (10 + 16))  # drop the last chunk whole
    return f"{BIG} was truncated"


def _truncate_empty_file(made: Made) -> str:
    os.truncate(made.object_path("empty"), 0)
    return "empty was truncated"


def _extend_one_byte(made: Made) -> str:
    with made.object_path(BIG).open("ab") as handle:
        handle.write(b"\0")
    return f"{BIG} was extended"


def _extend_one_chunk(made: Made) -> str:
    path = made.object_path(BIG)
    data = path.read_bytes()
    path.write_bytes(data + data[-STORED_CHUNK:])
    return f"{BIG} was extended"


def _swap_objects_same_size(made: Made) -> str:
    big, twin = made.object_path(BIG), made.object_path(TWIN)
    parked = big.with_name("parked")
    big.rename(parked)
    twin.rename(big)
    parked.rename(twin)
    return f"chunk 0 of {BIG} failed authentication"


def _swap_objects_different_size(made: Made) -> str:
    first, big = made.object_path("a.txt"), made.object_path(BIG)
    parked = big.with_name("parked")
    big.rename(parked)
    first.rename(big)
    parked.rename(first)
    return "a.txt was extended"


def _delete_object(made: Made) -> str:
    made.object_path(BIG).unlink()
    return f"{BIG} is missing from the volume"


def _extra_object(made: Made) -> str:
    (made.root / "objects" / ("0" * 32)).write_bytes(b"x" * 100)
    return f"unexpected stored object objects/{'0' * 32}"


def _extra_folder_in_objects(made: Made) -> str:
    (made.root / "objects" / "sub").mkdir()
    return "unexpected stored object objects/sub"


def _extra_top_level_file(made: Made) -> str:
    (made.root / "README").write_text("hello")
    return "unexpected entry 'README'"


def _plain_file_in_encrypted_region(made: Made) -> str:
    write_tree(made.root / "plain", {"docs/evil.txt": b"evil"})
    return "plain/docs/evil.txt lies in a protected region"


def _plain_file_replacing_protected_file(made: Made) -> str:
    write_tree(made.root / "plain", {"a.txt": b"evil"})
    return "plain/a.txt lies in a protected region"


def _plain_file_in_authenticated_region(made: Made) -> str:
    write_tree(made.root / "plain", {"auth/evil.txt": b"evil"})
    return "plain/auth/evil.txt lies in a protected region"


ATTACKS = [
    _flip_first, _flip_chunk3_middle, _flip_last_tag_byte, _flip_empty_file_tag,
    _flip_authenticated_payload, _swap_chunks_1_and_2, _copy_chunk_from_other_file,
    _truncate_one_byte, _truncate_one_chunk,
    _truncate_empty_file, _extend_one_byte, _extend_one_chunk, _swap_objects_same_size,
    _swap_objects_different_size, _delete_object, _extra_object, _extra_folder_in_objects,
    _extra_top_level_file, _plain_file_in_encrypted_region,
    _plain_file_replacing_protected_file, _plain_file_in_authenticated_region,
]


@COMMANDS
@pytest.mark.parametrize("attack", ATTACKS, ids=lambda attack: attack.__name__.strip("_"))
def test_stored_data_attack(vol: Made, out_dir: Path, cli: CliRunner, command: str,
                            attack: Callable[[Made], str]) -> None:
    reason = attack(vol)
    refused(cli, command, vol, out_dir, 4, reason)


def test_reading_api_never_yields_a_bad_chunk(vol: Made) -> None:
    """``Volume.read`` yields chunks 0..2, then refuses chunk 3 instead of returning it."""
    flip(vol.object_path(BIG), 3 * STORED_CHUNK + 1)
    opened = Volume.open(vol.root, vol.key, vol.tag)
    chunks: list[bytes] = []
    with pytest.raises(IntegrityError, match=f"chunk 3 of {BIG} failed authentication"):
        chunks.extend(opened.read(BIG))
    assert b"".join(chunks) == FILES[BIG][: 3 * C]  # type: ignore[index]


def test_extract_into_missing_folder_creates_nothing(vol: Made, tmp_path: Path,
                                                     cli: CliRunner) -> None:
    """A refused extraction must not leave even an empty output folder behind."""
    _flip_chunk3_middle(vol)
    out = tmp_path / "new-out"
    result = cli("volume", "extract", vol.root, out, *vol.key_args())
    assert_error(result, 4, f"chunk 3 of {BIG} failed authentication")
    assert not out.exists()


# -- not-protected files ----------------------------------------------------------------


def test_not_protected_file_change_is_accepted(vol: Made, out_dir: Path,
                                               cli: CliRunner) -> None:
    """Documented behaviour: files of a not-protected region are not integrity-checked."""
    (vol.root / "plain" / "open" / "notes.txt").write_bytes(b"changed by someone")
    (vol.root / "plain" / "open" / "added.txt").write_bytes(b"added by someone")
    verified = cli("volume", "verify", vol.root, *vol.key_args())
    assert verified.code == 0, verified.err
    result = cli("volume", "extract", vol.root, out_dir, *vol.key_args())
    assert result.code == 0, result.err
    assert (out_dir / "open" / "notes.txt").read_bytes() == b"changed by someone"
    assert (out_dir / "open" / "added.txt").read_bytes() == b"added by someone"
    assert (out_dir / BIG).read_bytes() == FILES[BIG]


# -- keys, tags, rollback ----------------------------------------------------------------


@COMMANDS
def test_wrong_key(vol: Made, out_dir: Path, cli: CliRunner, command: str) -> None:
    other = VolumeKey.generate()
    refused(cli, command, vol, out_dir, 5, "wrong key: this key does not open the volume",
            key=other)


@COMMANDS
def test_wrong_tag(vol: Made, out_dir: Path, cli: CliRunner, command: str) -> None:
    refused(cli, command, vol, out_dir, 4, "tag mismatch (rollback or tampering)",
            tag=VolumeTag(bytes(16)))


@COMMANDS
def test_rollback_is_refused(vol: Made, out_dir: Path, tmp_path: Path, cli: CliRunner,
                             command: str) -> None:
    backup = tmp_path / "backup"
    shutil.copytree(vol.root, backup)
    update = write_tree(tmp_path / "update", {"a.txt": b"version 2", "new.txt": b"new"})
    added = cli("volume", "add", vol.root, update, *vol.key_args(), "--envar-output")
    assert added.code == 0, added.err
    new_tag = VolumeTag.from_hex(added.out.splitlines()[1].removeprefix("export VOLUME_TAG="))
    assert new_tag != vol.tag

    # the old tag no longer opens the updated volume
    refused(cli, command, vol, out_dir, 4, "tag mismatch (rollback or tampering)")
    assert cli("volume", "verify", vol.root, "--key", vol.key.hex(),
               "--tag", new_tag.hex()).code == 0

    # roll back only the FSPF (the objects stay new): refused
    fspf = vol.root / "volume.fspf"
    current = fspf.read_bytes()
    fspf.write_bytes((backup / "volume.fspf").read_bytes())
    refused(cli, command, vol, out_dir, 4, "tag mismatch (rollback or tampering)", tag=new_tag)
    fspf.write_bytes(current)

    # put the whole old folder back: refused as well
    shutil.rmtree(vol.root)
    shutil.copytree(backup, vol.root)
    refused(cli, command, vol, out_dir, 4, "tag mismatch (rollback or tampering)", tag=new_tag)


def test_volume_changed_since_opened(vol: Made, tmp_path: Path) -> None:
    """A Volume object refuses to work on a folder another writer has changed since."""
    stale = Volume.open(vol.root, vol.key, vol.tag)
    update = write_tree(tmp_path / "update", {"a.txt": b"v2"})
    Volume.open(vol.root, vol.key, vol.tag).add(update)
    with pytest.raises(ConflictError, match="changed since it was opened"):
        stale.verify()
    with pytest.raises(ConflictError, match="changed since it was opened"):
        stale.extract(tmp_path / "out")
    with pytest.raises(ConflictError, match="changed since it was opened"):
        stale.add(update)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("target", ["object", "fspf"])
def test_special_file_is_refused_not_waited_on(vol: Made, target: str) -> None:
    """A FIFO planted in place of a stored file must be refused, not block the reader."""
    path = vol.object_path(BIG) if target == "object" else vol.root / "volume.fspf"
    path.unlink()
    os.mkfifo(path)
    environment = {**os.environ, "VOLUME_KEY": vol.key.hex(), "VOLUME_TAG": vol.tag.hex()}
    try:
        done = subprocess.run([sys.executable, "-m", "tdapp", "volume", "verify", str(vol.root)],
                              capture_output=True, text=True, env=environment, timeout=5,
                              check=False)
    except subprocess.TimeoutExpired:
        pytest.fail(f"tdapp volume verify blocked on a FIFO in place of the {target}")
    assert done.returncode in (3, 4), done.stderr
    assert done.stderr.startswith("tdapp: error: ")

"""The CLI error convention: one ``tdapp: error: …`` line, a documented exit code, no traceback."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import CliResult, Made, MakeVolume, assert_error, run_tdapp, write_tree

from tdapp.errors import ExitCode
from tdapp.volume import VolumeKey
from tdapp.volume.layout import VolumeFolder

CliRunner = Callable[..., CliResult]
KEY_LINE = re.compile(r"^export VOLUME_KEY=[0-9a-f]{64}$")
TAG_LINE = re.compile(r"^export VOLUME_TAG=[0-9a-f]{32}$")


@pytest.fixture
def vol(make_volume: MakeVolume) -> Made:
    return make_volume({"a.txt": b"alpha", "sub/b.txt": b"beta" * 40})


def _bad_hex_key(made: Made, tmp_path: Path) -> tuple[list[str | Path], int, str]:
    return (["volume", "verify", made.root, "--key", "zz" * 32, "--tag", made.tag.hex()],
            ExitCode.USAGE, "volume key is not hexadecimal")


def _short_key(made: Made, tmp_path: Path) -> tuple[list[str | Path], int, str]:
    return (["volume", "verify", made.root, "--key", "abc", "--tag", made.tag.hex()],
            ExitCode.USAGE, "volume key must be 64 hex characters, got 3")


def _bad_hex_tag(made: Made, tmp_path: Path) -> tuple[list[str | Path], int, str]:
    return (["volume", "verify", made.root, "--key", made.key.hex(), "--tag", "g" * 32],
            ExitCode.USAGE, "volume tag is not hexadecimal")


def _missing_key(made: Made, tmp_path: Path) -> tuple[list[str | Path], int, str]:
    return (["volume", "verify", made.root, "--tag", made.tag.hex()],
            ExitCode.USAGE, "Missing option '--key'")


def _missing_volume_folder(made: Made, tmp_path: Path) -> tuple[list[str | Path], int, str]:
    return (["volume", "verify", tmp_path / "nowhere", *made.key_args()],
            ExitCode.INPUT, "nowhere does not exist")


def _folder_without_volume(made: Made, tmp_path: Path) -> tuple[list[str | Path], int, str]:
    (tmp_path / "plain-folder").mkdir()
    return (["volume", "extract", tmp_path / "plain-folder", tmp_path / "out",
             *made.key_args()], ExitCode.INPUT, "is not a tdapp volume (no volume.fspf)")


def _create_in_non_empty(made: Made, tmp_path: Path) -> tuple[list[str | Path], int, str]:
    return (["volume", "create", made.root, "--from", made.source],
            ExitCode.INPUT, "is not empty; a new volume needs an empty folder")


def _unknown_region_kind(made: Made, tmp_path: Path) -> tuple[list[str | Path], int, str]:
    return (["volume", "create", tmp_path / "new", "--from", made.source,
             "--region", "/sub=secret"], ExitCode.USAGE, "unknown region kind 'secret'")


def _malformed_region(made: Made, tmp_path: Path) -> tuple[list[str | Path], int, str]:
    return (["volume", "create", tmp_path / "new", "--region", "encrypted"],
            ExitCode.USAGE, "must look like PATH=KIND")


def _bad_chunk_size(made: Made, tmp_path: Path) -> tuple[list[str | Path], int, str]:
    return (["volume", "create", tmp_path / "new", "--chunk-size", "8"],
            ExitCode.USAGE, "chunk size must be between 16 and")


def _symlink_in_source(made: Made, tmp_path: Path) -> tuple[list[str | Path], int, str]:
    source = write_tree(tmp_path / "linked", {"real.txt": b"real"})
    (source / "link").symlink_to(source / "real.txt")
    return (["volume", "create", tmp_path / "new", "--from", source],
            ExitCode.INPUT, "is a symbolic link")


def _symlink_in_added_source(made: Made, tmp_path: Path) -> tuple[list[str | Path], int, str]:
    source = write_tree(tmp_path / "linked", {"real.txt": b"real"})
    (source / "link").symlink_to("/etc")
    return (["volume", "add", made.root, source, *made.key_args()],
            ExitCode.INPUT, "is a symbolic link")


def _wrong_key(made: Made, tmp_path: Path) -> tuple[list[str | Path], int, str]:
    return (["volume", "extract", made.root, tmp_path / "out",
             "--key", VolumeKey.generate().hex(), "--tag", made.tag.hex()],
            ExitCode.WRONG_KEY, "wrong key")


def _tag_mismatch(made: Made, tmp_path: Path) -> tuple[list[str | Path], int, str]:
    return (["volume", "show", made.root, "--key", made.key.hex(), "--tag", "00" * 16],
            ExitCode.INTEGRITY, "tag mismatch (rollback or tampering)")


def _unknown_command(made: Made, tmp_path: Path) -> tuple[list[str | Path], int, str]:
    return (["volume", "destroy", made.root], ExitCode.USAGE, "No such command 'destroy'")


CASES = [_bad_hex_key, _short_key, _bad_hex_tag, _missing_key, _missing_volume_folder,
         _folder_without_volume, _create_in_non_empty, _unknown_region_kind, _malformed_region,
         _bad_chunk_size, _symlink_in_source, _symlink_in_added_source, _wrong_key,
         _tag_mismatch, _unknown_command]


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.__name__.strip("_"))
@pytest.mark.parametrize("how", ["in-process", "subprocess"])
def test_error_convention(vol: Made, tmp_path: Path, cli: CliRunner, how: str,
                          case: Callable[[Made, Path], tuple[list[str | Path], int, str]]
                          ) -> None:
    args, code, fragment = case(vol, tmp_path)
    before = sorted(os.listdir(tmp_path))
    volume_before = {p: p.read_bytes() for p in vol.root.rglob("*") if p.is_file()}
    result = cli(*args) if how == "in-process" else run_tdapp(*args)
    assert_error(result, code, fragment)
    assert result.out == ""
    assert vol.key.hex() not in result.err
    # a failed command leaves no new folder (no half-made volume, no output folder)
    assert sorted(os.listdir(tmp_path)) == before
    assert {p: p.read_bytes() for p in vol.root.rglob("*") if p.is_file()} == volume_before


@pytest.mark.parametrize("how", ["in-process", "subprocess"])
def test_envar_output(tmp_path: Path, cli: CliRunner, how: str) -> None:
    source = write_tree(tmp_path / "src", {"f": b"data"})
    run = cli if how == "in-process" else run_tdapp
    created = run("volume", "create", tmp_path / "vol", "--from", source, "--envar-output")
    assert created.code == 0, created.err
    lines = created.out.splitlines()
    assert created.out.endswith("\n")
    assert len(lines) == 2
    assert KEY_LINE.match(lines[0]), lines
    assert TAG_LINE.match(lines[1]), lines

    env = dict(line.removeprefix("export ").split("=", 1) for line in lines)
    update = write_tree(tmp_path / "update", {"g": b"more"})
    added = run_tdapp("volume", "add", tmp_path / "vol", update, "--envar-output", env=env)
    assert added.code == 0, added.err
    added_lines = added.out.splitlines()
    assert len(added_lines) == 2
    assert added_lines[0] == lines[0]  # same key
    assert TAG_LINE.match(added_lines[1])
    assert added_lines[1] != lines[1]  # new tag


def test_plain_output_names_key_and_tag(tmp_path: Path, cli: CliRunner) -> None:
    created = cli("volume", "create", tmp_path / "vol")
    assert created.code == 0, created.err
    lines = created.out.splitlines()
    assert len(lines) == 2
    assert re.fullmatch(r"key: [0-9a-f]{64}", lines[0])
    assert re.fullmatch(r"tag: [0-9a-f]{32}", lines[1])


def test_environment_supplies_key_and_tag(vol: Made, tmp_path: Path, cli: CliRunner,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VOLUME_KEY", vol.key.hex())
    monkeypatch.setenv("VOLUME_TAG", vol.tag.hex())
    verified = cli("volume", "verify", vol.root)
    assert verified.code == 0, verified.err
    assert verified.out.startswith("ok: 2 files")
    assert vol.tag.hex() in verified.out
    extracted = cli("volume", "extract", vol.root, tmp_path / "out")
    assert extracted.code == 0, extracted.err
    assert (tmp_path / "out" / "sub" / "b.txt").read_bytes() == b"beta" * 40

    # the environment is really read: a wrong key there is refused ...
    monkeypatch.setenv("VOLUME_KEY", VolumeKey.generate().hex())
    assert_error(cli("volume", "verify", vol.root), ExitCode.WRONG_KEY, "wrong key")
    # ... and a flag wins over the environment
    assert cli("volume", "verify", vol.root, "--key", vol.key.hex()).code == 0

    result = run_tdapp("volume", "verify", vol.root,
                       env={"VOLUME_KEY": vol.key.hex(), "VOLUME_TAG": vol.tag.hex()})
    assert result.code == 0, result.err


@pytest.mark.parametrize("how", ["flag", "environment"])
def test_debug_shows_traceback(tmp_path: Path, how: str) -> None:
    args = ["volume", "verify", tmp_path / "nowhere", "--key", "11" * 32, "--tag", "22" * 16]
    if how == "flag":
        result = run_tdapp("--debug", *args)
    else:
        result = run_tdapp(*args, env={"TDAPP_DEBUG": "1"})
    assert result.code == ExitCode.INPUT
    assert "Traceback (most recent call last)" in result.err
    assert "InputError" in result.err
    assert result.err.splitlines()[-1].startswith("tdapp: error: ")
    assert "does not exist" in result.err.splitlines()[-1]


def test_debug_in_process(tmp_path: Path, cli: CliRunner) -> None:
    result = cli("--debug", "volume", "verify", tmp_path / "nowhere",
                 "--key", "11" * 32, "--tag", "22" * 16)
    assert result.code == ExitCode.INPUT
    assert "Traceback (most recent call last)" in result.err
    expected = f"tdapp: error: volume folder {tmp_path / 'nowhere'} does not exist"
    assert result.err.splitlines()[-1] == expected


@pytest.mark.parametrize(("command", "exclusive"), [("verify", True), ("add", False)])
def test_concurrent_writer_is_a_conflict(vol: Made, tmp_path: Path, cli: CliRunner,
                                         command: str, exclusive: bool) -> None:
    """While another process holds the volume's lock, commands fail with exit code 8."""
    args: list[str | Path] = ["volume", command, vol.root]
    if command == "add":
        args.append(write_tree(tmp_path / "update", {"c.txt": b"c"}))
    with VolumeFolder(vol.root).locked(exclusive=exclusive):
        result = cli(*args, *vol.key_args())
    assert_error(result, ExitCode.CONFLICT, "is being written by another process")
    assert cli("volume", "verify", vol.root, *vol.key_args()).code == 0  # unchanged

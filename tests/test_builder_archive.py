"""``tdapp image export|import``: deterministic archives; imports refuse anything unsafe."""

from __future__ import annotations

import io
import os
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import CliResult

import tdapp.cli
from tdapp.cli.build import build, image, images, measure
from tdapp.errors import ExitCode

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "copy_dapp"
Cli = Callable[..., CliResult]


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TDAPP_HOME", str(tmp_path / "home"))
    for command in (build, measure, images, image):
        monkeypatch.setitem(tdapp.cli.cli.commands, str(command.name), command)
    return tmp_path / "home"


@pytest.fixture
def exported(cli: Cli, tmp_path: Path) -> tuple[Path, str]:
    """The copy DApp built as copy_demo and exported; (archive, measurement)."""
    app = shutil.copytree(EXAMPLE, tmp_path / "app", ignore=shutil.ignore_patterns("copy_files"))
    result = cli("build", app, "--name", "copy_demo")
    assert result.code == 0, result.err
    archive = tmp_path / "copy_demo.tar"
    exported = cli("image", "export", "copy_demo", archive)
    assert exported.code == 0, exported.err
    assert exported.out.strip() == result.out.strip()
    return archive, result.out.strip()


def error_line(result: CliResult, code: int) -> str:
    assert result.code == code, (result.code, result.err)
    lines = result.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("tdapp: error: "), result.err
    return lines[0]


def stored(home: Path) -> list[str]:
    """What the store holds besides its lock file: images and any leftovers."""
    return sorted(set(os.listdir(home / "images")) - {".lock"})


def other_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "other-home"
    monkeypatch.setenv("TDAPP_HOME", str(home))
    return home


def test_export_is_deterministic(cli: Cli, exported: tuple[Path, str], tmp_path: Path) -> None:
    archive, _ = exported
    again = tmp_path / "again.tar"
    assert cli("image", "export", "copy_demo", again).code == 0
    assert archive.read_bytes() == again.read_bytes()
    with tarfile.open(archive) as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == ["manifest.json", "rootfs/copy_files"]
        for member in members:
            assert member.isreg() and member.mtime == 0
            assert (member.uid, member.gid, member.uname, member.gname) == (0, 0, "", "")
            assert member.pax_headers == {}
        assert members[1].mode == 0o755
    assert b"mtime=" not in archive.read_bytes() and b"atime=" not in archive.read_bytes()


def test_export_then_import_elsewhere_keeps_the_measurement(
        cli: Cli, exported: tuple[Path, str], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    archive, value = exported
    other_home(tmp_path, monkeypatch)
    result = cli("image", "import", archive)
    assert result.code == 0, result.err
    assert result.out.strip() == value
    assert cli("measure", "copy_demo").out.strip() == value
    # Importing and exporting again gives the very same archive.
    assert cli("image", "export", "copy_demo", tmp_path / "re.tar").code == 0
    assert (tmp_path / "re.tar").read_bytes() == archive.read_bytes()
    renamed = cli("image", "import", archive, "--name", "copy_two")
    assert renamed.code == 0 and cli("measure", "copy_two").out.strip() == value


def test_import_does_not_silently_replace_another_image(
        cli: Cli, exported: tuple[Path, str], tmp_path: Path) -> None:
    archive, value = exported
    app = tmp_path / "app"
    assert cli("build", app, "--name", "copy_demo", "--heap", "64M").code == 0
    line = error_line(cli("image", "import", archive), ExitCode.CONFLICT)
    assert "an image named copy_demo already exists" in line and "--force" in line
    assert cli("image", "import", archive, "--force").code == 0
    assert cli("measure", "copy_demo").out.strip() == value


def _with_member(source: Path, target: Path, info: tarfile.TarInfo,
                 content: bytes = b"") -> Path:
    with tarfile.open(source) as good, tarfile.open(target, "w",
                                                     format=tarfile.PAX_FORMAT) as evil:
        for member in good.getmembers():
            evil.addfile(member, good.extractfile(member))
        info.size = len(content) if info.isreg() else 0
        evil.addfile(info, io.BytesIO(content) if info.isreg() else None)
    return target


def _member(name: str, kind: bytes = tarfile.REGTYPE, mode: int = 0o644,
            linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.linkname = kind, mode, linkname
    if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        info.devmajor, info.devminor = 1, 3
    return info


EVIL = [
    ("../x", _member("../x"), "has a '..' component (path traversal)"),
    ("rootfs/../../x", _member("rootfs/../../x"), "has a '..' component (path traversal)"),
    ("absolute", _member("/ABSOLUTE/x"), "is an absolute path"),
    ("symlink out of the image", _member("rootfs/x", tarfile.SYMTYPE,
                                         linkname="../../etc/passwd"),
     "leads out of the image root"),
    ("hard link", _member("rootfs/x", tarfile.LNKTYPE, linkname="rootfs/copy_files"),
     "is a hard link"),
    ("device", _member("rootfs/x", tarfile.CHRTYPE), "is a device node"),
    ("block device", _member("rootfs/x", tarfile.BLKTYPE), "is a device node"),
    ("fifo", _member("rootfs/x", tarfile.FIFOTYPE), "is a FIFO"),
    ("setuid", _member("rootfs/x", mode=0o4755), "has setuid, setgid or sticky bits"),
    ("stray", _member("x"), "unexpected member 'x'"),
    ("duplicate", _member("rootfs/copy_files"), "appears twice"),
]


@pytest.mark.parametrize(("label", "info", "reason"), EVIL, ids=[case[0] for case in EVIL])
def test_unsafe_archives_are_refused_and_write_nothing(
        cli: Cli, exported: tuple[Path, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        label: str, info: tarfile.TarInfo, reason: str) -> None:
    archive, _ = exported
    evil = _with_member(archive, tmp_path / "evil.tar", info, b"pwned\n")
    home = other_home(tmp_path, monkeypatch)
    work = tmp_path / "deep" / "work"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    before = {path for path in tmp_path.rglob("*") if home not in path.parents}
    line = error_line(cli("image", "import", evil), ExitCode.INPUT)
    assert reason in line and "refused" in line
    after = {path for path in tmp_path.rglob("*") if home not in path.parents and path != home}
    assert after == before
    assert not Path("/ABSOLUTE").exists()
    assert stored(home) == []


def test_an_archive_whose_files_were_changed_is_refused(
        cli: Cli, exported: tuple[Path, str], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    archive, value = exported
    changed = tmp_path / "changed.tar"
    with tarfile.open(archive) as good, tarfile.open(changed, "w",
                                                     format=tarfile.PAX_FORMAT) as bad:
        for member in good.getmembers():
            data = bytearray(good.extractfile(member).read())  # type: ignore[union-attr]
            if member.name == "rootfs/copy_files":
                data[100] ^= 0xFF
            bad.addfile(member, io.BytesIO(bytes(data)))
    home = other_home(tmp_path, monkeypatch)
    line = error_line(cli("image", "import", changed), ExitCode.INTEGRITY)
    assert "its files do not give its recorded measurement" in line
    assert f"recorded {value}" in line
    assert stored(home) == []


def test_not_an_archive(cli: Cli, tmp_path: Path) -> None:
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"not a tar at all" * 100)
    assert "is not a tar archive" in error_line(cli("image", "import", junk), ExitCode.INPUT)
    assert "does not exist" in error_line(cli("image", "import", tmp_path / "none.tar"),
                                          ExitCode.INPUT)

"""Attacks on ``tdapp image import`` with crafted archives: nothing may land outside the store.

Each hostile archive carries a manifest.json that records exactly its hostile
tree with the right measurement, so only the import's own checks stand in the
way. Every attack asserts its effect did not happen: the concrete paths it
aims at do not exist, nothing changed outside the store, and the store holds
no image and no staging folder; and the CLI printed one ``tdapp: error:`` line
naming the entry.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import CliResult, assert_error

import tdapp.cli
from tdapp.builder.manifest import Config, DirRecord, FileRecord, LinkRecord, Manifest
from tdapp.builder.measure import Tree, measurement
from tdapp.builder.store import Staging
from tdapp.cli.build import image, images, measure
from tdapp.errors import ExitCode, InputError

Cli = Callable[..., CliResult]
PAYLOAD = b"pwned\n"


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TDAPP_HOME", str(tmp_path / "home"))
    for command in (measure, images, image):
        monkeypatch.setitem(tdapp.cli.cli.commands, str(command.name), command)
    return tmp_path / "home"


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """An existing folder outside the store, as /tmp or ~/.ssh would be for a real victim."""
    folder = tmp_path / "outside"
    folder.mkdir()
    return folder


@dataclass(frozen=True)
class Member:
    """One ``rootfs/`` member of a crafted archive."""

    path: str  # under rootfs/
    kind: bytes = tarfile.REGTYPE
    mode: int = 0o644
    target: str = ""  # link target (symbolic or hard)
    data: bytes = PAYLOAD


def manifest_for(members: list[Member], entrypoint: str = "/bin/app") -> Manifest:
    """The manifest an honest exporter would write for exactly this tree."""
    files = tuple(FileRecord(m.path, m.mode, len(m.data), hashlib.sha256(m.data).hexdigest())
                  for m in members if m.kind == tarfile.REGTYPE)
    dirs = tuple(DirRecord(m.path, m.mode) for m in members if m.kind == tarfile.DIRTYPE)
    links = tuple(LinkRecord(m.path, m.target) for m in members if m.kind == tarfile.SYMTYPE)
    config = Config((entrypoint,), 40 * 1024 * 1024, 4 * 1024 * 1024, "sim", ())
    tree = Tree(tuple(sorted(files, key=lambda r: r.path)),
                tuple(sorted(dirs, key=lambda r: r.path)),
                tuple(sorted(links, key=lambda r: r.path)))
    return Manifest("evil", config, tree.files, measurement(config, tree),
                    "2024-01-01T00:00:00Z", tree.dirs, tree.links)


def write_archive(path: Path, members: list[Member], manifest: Manifest | None = None) -> Path:
    """manifest.json first, then the members in the order given (an attacker picks it)."""
    data = (manifest or manifest_for(members)).to_json()
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("manifest.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
        for member in members:
            info = tarfile.TarInfo(f"rootfs/{member.path}")
            info.type, info.mode, info.linkname = member.kind, member.mode, member.target
            regular = member.kind == tarfile.REGTYPE
            info.size = len(member.data) if regular else 0
            tar.addfile(info, io.BytesIO(member.data) if regular else None)
    return path


def snapshot(tmp_path: Path, home: Path) -> dict[str, tuple[int, int]]:
    """Every path under tmp_path outside the store, with its mode and size."""
    seen: dict[str, tuple[int, int]] = {}
    for folder, names, files in os.walk(tmp_path):
        names[:] = [name for name in names if Path(folder, name) != home]
        for name in names + files:
            info = os.lstat(Path(folder, name))
            seen[os.path.join(folder, name)] = (info.st_mode, info.st_size)
    return seen


def store_leftovers(home: Path) -> list[str]:
    """Images and staging folders in the store (its lock file aside)."""
    return sorted(set(os.listdir(home / "images")) - {".lock"})


def import_refused(cli: Cli, archive: Path, tmp_path: Path, home: Path, code: int,
                   entry: str, reason: str, aimed_at: tuple[Path, ...] = ()) -> None:
    """Import ``archive``: nothing at ``aimed_at`` nor anywhere outside the store, nothing
    left in the store, and one error line naming ``entry``."""
    before = snapshot(tmp_path, home)
    result = cli("image", "import", archive)
    for path in aimed_at:
        assert not os.path.lexists(path), f"{path} was created outside the store"
    assert snapshot(tmp_path, home) == before
    assert store_leftovers(home) == []
    assert_error(result, code, reason)
    assert entry in result.err, result.err


def relative_to_host_root(path: Path) -> str:
    return str(path).lstrip("/")


def test_a_file_through_a_link_to_the_host_root_is_refused(
        cli: Cli, tmp_path: Path, home: Path, outside: Path) -> None:
    # r -> / then r/tmp/…/outside/PWNED: the file would land in the host's folder.
    planted = f"r/{relative_to_host_root(outside)}/PWNED"
    archive = write_archive(tmp_path / "evil.tar", [
        Member("r", tarfile.SYMTYPE, 0o777, "/"), Member(planted)])
    import_refused(cli, archive, tmp_path, home, ExitCode.INPUT, f"rootfs/{planted}",
                   "lies under the symbolic link 'rootfs/r'", (outside / "PWNED",))


def test_a_link_planted_through_a_link_to_the_host_root_is_refused(
        cli: Cli, tmp_path: Path, home: Path, outside: Path) -> None:
    # The planted link ``a -> ../../..`` climbs nowhere from where the archive says it
    # sits, so it passes the lexical check; it must still never be created outside.
    planted = f"r/{relative_to_host_root(outside)}/a"
    archive = write_archive(tmp_path / "evil.tar", [
        Member("r", tarfile.SYMTYPE, 0o777, "/"),
        Member(planted, tarfile.SYMTYPE, 0o777, "../../..")])
    import_refused(cli, archive, tmp_path, home, ExitCode.INPUT, f"rootfs/{planted}",
                   "lies under the symbolic link 'rootfs/r'", (outside / "a",))


def test_a_link_climbing_out_of_the_image_is_refused(
        cli: Cli, tmp_path: Path, home: Path) -> None:
    # rootfs/a -> ../../.. would be the store's parent; then a file through it.
    archive = write_archive(tmp_path / "evil.tar", [
        Member("a", tarfile.SYMTYPE, 0o777, "../../.."), Member("a/PWNED")])
    import_refused(cli, archive, tmp_path, home, ExitCode.INPUT, "rootfs/a",
                   "leads out of the image root", (tmp_path / "PWNED", home / "PWNED"))


def test_a_hard_link_through_a_symbolic_link_is_refused(
        cli: Cli, tmp_path: Path, home: Path, outside: Path) -> None:
    planted = f"r/{relative_to_host_root(outside)}/hard"
    archive = write_archive(tmp_path / "evil.tar", [
        Member("app"), Member("r", tarfile.SYMTYPE, 0o777, "/"),
        Member(planted, tarfile.LNKTYPE, 0o644, "rootfs/app")])
    import_refused(cli, archive, tmp_path, home, ExitCode.INPUT, f"rootfs/{planted}",
                   "is a hard link", (outside / "hard",))


def test_a_hard_link_to_a_host_file_through_a_symbolic_link_is_refused(
        cli: Cli, tmp_path: Path, home: Path, outside: Path) -> None:
    # A hard link whose *target* runs through r -> / would pull a host file into the store.
    secret = outside / "secret"
    secret.write_bytes(b"host secret\n")
    archive = write_archive(tmp_path / "evil.tar", [
        Member("r", tarfile.SYMTYPE, 0o777, "/"),
        Member("stolen", tarfile.LNKTYPE, 0o644,
               f"rootfs/r/{relative_to_host_root(secret)}")])
    import_refused(cli, archive, tmp_path, home, ExitCode.INPUT, "rootfs/stolen",
                   "is a hard link")
    assert secret.stat().st_nlink == 1


def test_a_file_through_a_chain_of_links_is_refused(
        cli: Cli, tmp_path: Path, home: Path, outside: Path) -> None:
    # a -> b, b -> /: neither is a parent of the file by itself in the old check.
    planted = f"a/{relative_to_host_root(outside)}/PWNED"
    archive = write_archive(tmp_path / "evil.tar", [
        Member("b", tarfile.SYMTYPE, 0o777, "/"), Member("a", tarfile.SYMTYPE, 0o777, "b"),
        Member(planted)])
    import_refused(cli, archive, tmp_path, home, ExitCode.INPUT, f"rootfs/{planted}",
                   "lies under the symbolic link 'rootfs/a'", (outside / "PWNED",))


def test_a_file_under_a_link_to_a_sibling_of_the_staging_folder_is_refused(
        cli: Cli, tmp_path: Path, home: Path) -> None:
    # The staging folder's sibling: another image in the same store, to be tampered with.
    victim = home / "images" / "victim" / "rootfs" / "bin"
    victim.mkdir(parents=True)
    archive = write_archive(tmp_path / "evil.tar", [
        Member("s", tarfile.SYMTYPE, 0o777, str(home / "images" / "victim")),
        Member("s/rootfs/bin/PWNED", mode=0o755),
        Member("s/rootfs/bin/sh", tarfile.SYMTYPE, 0o777, "/")])
    result = cli("image", "import", archive)
    assert os.listdir(victim) == []
    assert store_leftovers(home) == ["victim"]
    assert_error(result, ExitCode.INPUT, "lies under the symbolic link 'rootfs/s'")
    assert "rootfs/s/rootfs/bin/" in result.err


@pytest.mark.parametrize(("members", "entry", "reason"), [
    ([Member("f"), Member("f/PWNED")], "rootfs/f/PWNED", "lies under the file 'rootfs/f'"),
    ([Member("unlisted/PWNED")], "rootfs/unlisted/PWNED",
     "lies in rootfs/unlisted, which the archive does not hold as a folder")],
    ids=["under a file", "in an unlisted folder"])
def test_an_entry_must_lie_in_folders_the_archive_holds(
        cli: Cli, tmp_path: Path, home: Path, members: list[Member], entry: str,
        reason: str) -> None:
    archive = write_archive(tmp_path / "evil.tar", members)
    import_refused(cli, archive, tmp_path, home, ExitCode.INPUT, entry, reason)


@pytest.mark.parametrize(("kind", "mode"), [
    (tarfile.REGTYPE, 0o4755), (tarfile.REGTYPE, 0o2755), (tarfile.REGTYPE, 0o1755),
    (tarfile.DIRTYPE, 0o4755), (tarfile.DIRTYPE, 0o2775)],
    ids=["setuid file", "setgid file", "sticky file", "setuid folder", "setgid folder"])
def test_setuid_setgid_and_sticky_files_never_enter_the_store(
        cli: Cli, tmp_path: Path, home: Path, kind: bytes, mode: int) -> None:
    archive = write_archive(tmp_path / "evil.tar", [Member("bin", kind, mode)])
    import_refused(cli, archive, tmp_path, home, ExitCode.INPUT, "rootfs/bin",
                   f"(mode {mode:04o}); refused")
    for folder, names, files in os.walk(home):
        for name in names + files:
            assert not os.lstat(Path(folder, name)).st_mode & (stat.S_ISUID | stat.S_ISGID)


def test_a_tampered_export_is_refused_and_the_stored_image_kept(
        cli: Cli, tmp_path: Path, home: Path) -> None:
    honest = [Member("bin", tarfile.DIRTYPE, 0o755), Member("bin/app", mode=0o755),
              Member("tmp", tarfile.DIRTYPE, 0o1777),
              Member("sh", tarfile.SYMTYPE, 0o777, "/bin/app")]
    imported = cli("image", "import", write_archive(tmp_path / "good.tar", honest))
    assert imported.code == 0, imported.err
    value = imported.out.strip()
    assert cli("measure", "evil").out.strip() == value
    assert (home / "images" / "evil" / "rootfs" / "tmp").stat().st_mode & 0o7777 == 0o1777
    # Same tree, same recorded measurement, another entrypoint: the settings are measured.
    changed = manifest_for(honest, entrypoint="/sh")
    tampered = Manifest(changed.name, changed.config, changed.files, value, changed.created,
                        changed.dirs, changed.links)
    result = cli("image", "import", write_archive(tmp_path / "bad.tar", honest, tampered),
                 "--force")
    assert_error(result, ExitCode.INTEGRITY, "do not give its recorded measurement")
    assert cli("measure", "evil").out.strip() == value
    assert store_leftovers(home) == ["evil"]


def test_staging_itself_never_writes_through_a_link(tmp_path: Path, outside: Path) -> None:
    # The last line of defence, for every caller of Staging (build, container, import).
    with Staging() as staging:
        staging.make_link("r", "/")
        planted = f"r/{relative_to_host_root(outside)}"
        with pytest.raises(InputError, match="through the symbolic link 'r'"):
            os.close(staging.create_file(f"{planted}/PWNED", 0o644))
        with pytest.raises(InputError, match="through the symbolic link 'r'"):
            staging.make_link(f"{planted}/a", "../../..")
        with pytest.raises(InputError, match="through the symbolic link 'r'"):
            staging.make_dir(f"{planted}/sub")
        with pytest.raises(InputError, match="already something else than a folder"):
            staging.make_dir("r")
    assert os.listdir(outside) == []

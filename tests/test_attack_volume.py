"""Attacks on volumes by the host, the DApp or another key holder; each is performed and
its effect checked absent.

- setuid, setgid and sticky bits never come out of a volume (source trees, ``plain/``,
  an FSPF that records them, a DApp's ``chmod 06755`` through the shield);
- someone who can write the stored folder (host root, without the key) cannot plant
  folders under ``plain/``, nor make ``add`` delete or write files elsewhere, nor make
  ``extract`` copy files from elsewhere, with symbolic links;
- an FSPF sealed with the real key but malformed (deep nesting, duplicate keys, a
  file/folder clash, names with newlines or bidi controls) is refused by ``verify``
  and ``extract`` alike, in one line, with nothing written;
- such names are refused in a source tree too.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import CliResult, Made, MakeVolume, assert_error, snapshot, write_tree

from tdapp.errors import InputError
from tdapp.runtime.mounts import fuse_usable
from tdapp.volume import RegionKind, Volume, VolumeKey, VolumeTag
from tdapp.volume.chunks import FileSealer
from tdapp.volume.fspf import Manifest, open_fspf, seal_manifest_bytes

CliRunner = Callable[..., CliResult]
SPECIAL_BITS = stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX
NOT_A_MANIFEST = "volume.fspf content is not a valid manifest"
COMMANDS = pytest.mark.parametrize("command", ["verify", "extract"])


def special_bits(root: Path) -> dict[str, int]:
    """Every entry under ``root`` (root included) that has a setuid, setgid or sticky bit."""
    found = {}
    for current, dirnames, filenames in os.walk(root):
        for name in ["", *dirnames, *filenames]:
            path = Path(current) / name
            mode = path.lstat().st_mode
            if mode & SPECIAL_BITS:
                found[str(path)] = stat.S_IMODE(mode)
    return found


def new_tag(result: CliResult) -> VolumeTag:
    assert result.code == 0, result.err
    line = next(line for line in result.out.splitlines() if line.startswith("tag: "))
    return VolumeTag.from_hex(line.removeprefix("tag: "))


def run(cli: CliRunner, command: str, made: Made, out: Path,
        tag: VolumeTag | None = None) -> CliResult:
    key_args = ["--key", made.key.hex(), "--tag", (tag or made.tag).hex()]
    if command == "verify":
        return cli("volume", "verify", made.root, *key_args)
    return cli("volume", "extract", made.root, out, *key_args)


def refused_untouched(cli: CliRunner, command: str, made: Made, out: Path, code: int,
                      fragment: str, tag: VolumeTag | None = None) -> None:
    """``command`` is refused in one line and leaves ``out`` exactly as it was."""
    before = snapshot(out) if out.exists() else None
    result = run(cli, command, made, out, tag)
    assert (snapshot(out) if out.exists() else None) == before, result.err  # the effect
    assert_error(result, code, fragment)


# -- setuid, setgid and sticky bits -------------------------------------------------------


def test_special_bits_of_a_source_do_not_survive_create_add_extract(
        tmp_path: Path, cli: CliRunner) -> None:
    """A source with a setuid root binary: create, add and extract (as root) drop the bits."""
    assert os.geteuid() == 0, "the attack needs extraction as root"
    source = write_tree(tmp_path / "src", {"bin/su": b"#!/bin/sh\nid\n", "g": b"g",
                                           "open/tool": b"plain", "shared": None})
    os.chmod(source / "bin" / "su", 0o4755)
    os.chmod(source / "g", 0o2755)
    os.chmod(source / "open" / "tool", 0o6755)
    os.chmod(source / "shared", 0o1777)
    os.chmod(source / "bin", 0o2755)
    made = cli("volume", "create", tmp_path / "vol", "--from", source,
               "--region", "/open=not-protected")
    key = VolumeKey.from_hex(made.out.splitlines()[0].removeprefix("key: "))
    tag = new_tag(made)
    update = write_tree(tmp_path / "update", {"added": b"added", "open/more": b"more"})
    os.chmod(update / "added", 0o4711)
    os.chmod(update / "open" / "more", 0o4711)
    tag = new_tag(cli("volume", "add", tmp_path / "vol", update, "--key", key.hex(),
                      "--tag", tag.hex()))

    manifest = open_fspf((tmp_path / "vol" / "volume.fspf").read_bytes(), key, tag)
    assert all(not e.mode & SPECIAL_BITS for e in [*manifest.files.values(),
                                                    *manifest.dirs.values()])
    assert special_bits(tmp_path / "vol" / "plain") == {}
    out = tmp_path / "out"
    result = cli("volume", "extract", tmp_path / "vol", out, "--key", key.hex(),
                 "--tag", tag.hex())
    assert result.code == 0, result.err
    assert (out / "bin" / "su").read_bytes() == b"#!/bin/sh\nid\n"
    assert stat.S_IMODE((out / "bin" / "su").stat().st_mode) == 0o755
    assert (out / "open" / "more").exists()
    assert special_bits(out) == {}


def test_fspf_recording_special_bits_extracts_without_them(
        make_volume: MakeVolume, tmp_path: Path, cli: CliRunner) -> None:
    """An FSPF from an older or hostile key holder records 06755 and 01777: dropped."""
    made = make_volume({"bin/tool": b"tool", "tmp": None})

    def setuid_everything(document: dict[str, Any]) -> str:
        document["files"]["bin/tool"]["mode"] = 0o6755
        document["dirs"]["bin"]["mode"] = 0o2755
        document["dirs"]["tmp"]["mode"] = 0o1777
        return json.dumps(document)

    tag = forge(made, setuid_everything)
    assert run(cli, "verify", made, tmp_path, tag).code == 0
    out = tmp_path / "out"
    result = run(cli, "extract", made, out, tag)
    assert result.code == 0, result.err
    assert (out / "bin" / "tool").read_bytes() == b"tool"
    assert special_bits(out) == {}


def test_setuid_file_planted_in_plain_is_extracted_without_it(
        make_volume: MakeVolume, tmp_path: Path, cli: CliRunner) -> None:
    """The host puts a setuid file in a not-protected region: extract as root drops the bit."""
    made = make_volume({"open/log": b"log"}, regions={"open": RegionKind.NOT_PROTECTED})
    planted = made.root / "plain" / "open" / "sh"
    planted.write_bytes(b"#!/bin/sh\n")
    os.chmod(planted, 0o4755)
    os.chmod(made.root / "plain" / "open" / "log", 0o2644)
    out = tmp_path / "out"
    result = run(cli, "extract", made, out)
    assert result.code == 0, result.err
    assert (out / "open" / "sh").read_bytes() == b"#!/bin/sh\n"
    assert special_bits(out) == {}


# -- the stored folder: planted folders and links --------------------------------------------


@pytest.mark.parametrize("planted", ["evil", "docs/evil", "evil/deeper"])
@COMMANDS
def test_folder_planted_under_plain_is_refused(make_volume: MakeVolume, tmp_path: Path,
                                               cli: CliRunner, command: str,
                                               planted: str) -> None:
    made = make_volume({"docs/a.txt": b"a", "open/log": b"log"},
                       regions={"open": RegionKind.NOT_PROTECTED})
    (made.root / "plain" / planted).mkdir(parents=True)
    out = write_tree(tmp_path / "out", {"keep": b"keep"})
    first = planted.split("/")[0]
    refused_untouched(cli, command, made, out, 4, f"plain/{first} (a folder) lies in a "
                      "protected region")
    assert not (out / planted).exists()


def test_folders_holding_a_nested_not_protected_region_are_accepted(
        make_volume: MakeVolume, tmp_path: Path, cli: CliRunner) -> None:
    """What ``plain/`` legitimately holds: the parents of a nested not-protected region."""
    made = make_volume({"app/logs/x.log": b"x", "app/code.py": b"code"},
                       regions={"app/logs": RegionKind.NOT_PROTECTED})
    (made.root / "plain" / "app" / "logs" / "sub").mkdir()
    assert run(cli, "verify", made, tmp_path).code == 0
    assert run(cli, "extract", made, tmp_path / "out").code == 0
    assert (tmp_path / "out" / "app" / "logs" / "x.log").read_bytes() == b"x"


def test_plain_file_clashing_with_a_protected_folder_is_refused(
        make_volume: MakeVolume, tmp_path: Path, cli: CliRunner) -> None:
    """A file planted in a not-protected region where a protected folder must go."""
    made = make_volume({"open/x/sec/f": b"secret"},
                       regions={"open": RegionKind.NOT_PROTECTED,
                                "open/x/sec": RegionKind.ENCRYPTED})
    shutil.rmtree(made.root / "plain" / "open" / "x")
    (made.root / "plain" / "open" / "x").write_bytes(b"in the way")
    out = tmp_path / "out"
    for command in ("extract", "verify"):
        refused_untouched(cli, command, made, out, 4, "plain/ makes open/x both a file and "
                          "a folder")
    assert not out.exists()


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    """Someone else's files (say /var), which an attack through the volume folder wants."""
    return write_tree(tmp_path / "victim", {"logs/secret.log": b"root's secret"})


def test_symlinked_objects_does_not_make_add_delete_elsewhere(
        make_volume: MakeVolume, tmp_path: Path, cli: CliRunner) -> None:
    made = make_volume({"a.txt": b"a"})
    victim = write_tree(tmp_path / "victim", {"precious.txt": b"precious", "notes": b"n"})
    for stored in (made.root / "objects").iterdir():
        shutil.copy2(stored, victim)  # the real objects too, so everything else still works
    shutil.rmtree(made.root / "objects")
    (made.root / "objects").symlink_to(victim)
    before = snapshot(victim)
    update = write_tree(tmp_path / "update", {"b.txt": b"b"})
    result = cli("volume", "add", made.root, update, *made.key_args())
    assert snapshot(victim) == before, result.err  # nothing deleted, nothing written there
    assert_error(result, 4, "objects in the volume folder is not a folder")
    assert (made.root / "volume.fspf").read_bytes()[-16:] == made.tag.raw
    for command in ("verify", "extract"):
        refused_untouched(cli, command, made, tmp_path / "out", 4,
                          "objects in the volume folder is not a folder")
    assert snapshot(victim) == before


def test_symlinked_plain_does_not_make_extract_copy_from_elsewhere(
        make_volume: MakeVolume, tmp_path: Path, cli: CliRunner, victim: Path) -> None:
    made = make_volume({"a.txt": b"a", "logs/ours.log": b"ours"},
                       regions={"logs": RegionKind.NOT_PROTECTED})
    shutil.rmtree(made.root / "plain")
    (made.root / "plain").symlink_to(victim)
    out = write_tree(tmp_path / "out", {"keep": b"keep"})
    for command in ("extract", "verify"):
        refused_untouched(cli, command, made, out, 4, "plain in the volume folder is not a "
                          "folder")
    assert not (out / "logs").exists()
    assert b"root's secret" not in b"".join(
        path.read_bytes() for path in out.rglob("*") if path.is_file())


def test_symlink_inside_plain_is_refused(make_volume: MakeVolume, tmp_path: Path,
                                         cli: CliRunner, victim: Path) -> None:
    made = make_volume({"logs/ours.log": b"ours"}, regions={"logs": RegionKind.NOT_PROTECTED})
    (made.root / "plain" / "logs" / "stolen").symlink_to(victim / "logs")
    out = tmp_path / "out"
    for command in ("verify", "extract"):
        refused_untouched(cli, command, made, out, 4, "plain/logs/stolen in the volume is a "
                          "symbolic link")
    assert not out.exists()


def test_symlinked_plain_does_not_make_add_write_elsewhere(
        make_volume: MakeVolume, tmp_path: Path, cli: CliRunner, victim: Path) -> None:
    made = make_volume({"logs/ours.log": b"ours"}, regions={"logs": RegionKind.NOT_PROTECTED})
    shutil.rmtree(made.root / "plain")
    (made.root / "plain").symlink_to(victim)
    before = snapshot(victim)
    update = write_tree(tmp_path / "update", {"logs/cron": b"* * * * * root evil"})
    result = cli("volume", "add", made.root, update, *made.key_args())
    assert snapshot(victim) == before, result.err
    assert_error(result, 4, "plain in the volume folder is not a folder")
    assert list((made.root / "objects").iterdir()) == []  # nothing sealed either


def test_deep_tree_planted_in_plain_is_refused(make_volume: MakeVolume, tmp_path: Path,
                                               cli: CliRunner) -> None:
    """Deeper than any volume path may be: refused in one line, not walked or copied."""
    made = make_volume({"open/log": b"log"}, regions={"open": RegionKind.NOT_PROTECTED})
    (made.root / "plain" / "open" / "/".join(["d"] * 300)).mkdir(parents=True)
    out = tmp_path / "out"
    for command in ("extract", "verify"):
        refused_untouched(cli, command, made, out, 4, "has more than 255 components")
    assert not out.exists()


def test_source_deeper_than_a_volume_path_is_refused(tmp_path: Path, cli: CliRunner) -> None:
    source = tmp_path / "src"
    (source / "/".join(["d"] * 300)).mkdir(parents=True)
    result = cli("volume", "create", tmp_path / "vol", "--from", source)
    assert_error(result, 3, "has more than 255 components")
    assert not (tmp_path / "vol").exists()


# -- FSPFs sealed with the real key, but malformed ----------------------------------------------


def forge(made: Made, edit: Callable[[dict[str, Any]], str]) -> VolumeTag:
    """Rewrite the volume's manifest as a key holder could, sealed by the fspf module."""
    fspf = made.root / "volume.fspf"
    manifest = open_fspf(fspf.read_bytes(), made.key, made.tag)
    data, tag = seal_manifest_bytes(edit(json.loads(manifest.to_bytes())).encode(), made.key)
    fspf.write_bytes(data)
    return tag


def _deeply_nested(document: dict[str, Any]) -> str:
    return json.dumps(document)[:-1] + ',"x":' + "[" * 100_000 + "]" * 100_000 + "}"


def _duplicate_keys(document: dict[str, Any]) -> str:
    # A reader keeping the first "files" sees a.txt's content; one keeping the last, b.txt's.
    files = document["files"]
    swapped = {"a.txt": files["docs/b.txt"], "docs/b.txt": files["a.txt"]}
    return json.dumps(document)[:-1] + ',"files":' + json.dumps(swapped) + "}"


def _file_folder_clash(document: dict[str, Any]) -> str:
    document["files"]["a.txt/inner"] = document["files"].pop("docs/b.txt")
    return json.dumps(document)


def _file_and_folder_listed(document: dict[str, Any]) -> str:
    document["dirs"]["a.txt"] = document["dirs"]["docs"]
    return json.dumps(document)


def _newline_name(document: dict[str, Any]) -> str:
    document["files"]["ok.txt\nfake.txt"] = document["files"].pop("docs/b.txt")
    return json.dumps(document)


def _bidi_override_name(document: dict[str, Any]) -> str:
    document["files"]["invoice\u202etxt.exe"] = document["files"].pop("docs/b.txt")
    return json.dumps(document, ensure_ascii=False)


FORGERIES = [
    pytest.param(_deeply_nested, "nested too deeply", id="nesting-100000"),
    pytest.param(_duplicate_keys, "key 'files' appears twice", id="duplicate-keys"),
    pytest.param(_file_folder_clash, "'a.txt' is listed both as a file and as a folder",
                 id="file-folder-clash"),
    pytest.param(_file_and_folder_listed, "'a.txt' is listed both as a file and as a folder",
                 id="file-and-folder"),
    pytest.param(_newline_name, "contains the control character U+000A", id="newline-name"),
    pytest.param(_bidi_override_name, "contains the control character U+202E",
                 id="bidi-override-name"),
]


@COMMANDS
@pytest.mark.parametrize(("edit", "reason"), FORGERIES)
def test_malformed_authentic_fspf_is_refused(make_volume: MakeVolume, tmp_path: Path,
                                             cli: CliRunner, command: str,
                                             edit: Callable[[dict[str, Any]], str],
                                             reason: str) -> None:
    made = make_volume({"a.txt": b"a", "docs/b.txt": b"b"})
    tag = forge(made, edit)
    out = write_tree(tmp_path / "out", {"keep": b"keep"})
    refused_untouched(cli, command, made, out, 3, f"{NOT_A_MANIFEST}: ", tag=tag)
    result = run(cli, command, made, out, tag)
    assert reason in result.err
    assert "\u202e" not in result.err  # named escaped, never shown raw
    assert made.key.hex() not in result.err
    assert sorted(os.listdir(out)) == ["keep"]


MALFORMED_MANIFESTS = [
    pytest.param({"regions": [["", "encrypted"], ["", "encrypted"]]}, "listed twice",
                 id="region-twice"),
    pytest.param({"regions": [["../up", "not-protected"]]}, "'..' component",
                 id="region-dotdot"),
    pytest.param({"regions": [["a//b", "not-protected"]]}, "has a '' component", id="region-odd"),
    pytest.param({"extra": 1}, "'extra' is not a known field", id="unknown-field"),
    pytest.param({"files": {"a": {"region": "authenticated"}}}, "lies in a encrypted region",
                 id="region-mismatch"),
    pytest.param({"files": {"a": {"object": "AB" * 16}}}, "lower-case hex", id="upper-hex"),
    pytest.param({"files": {"a": {}, "b": {}}}, "listed for two files", id="shared-object"),
    pytest.param({"files": {"a": {"mode": 0o10000}}}, "mode 4096 is not an integer",
                 id="mode-too-big"),
    pytest.param({"chunk_size": 1e400}, "Infinity is not a number", id="infinite"),
    pytest.param({"generation": "HUGE"}, "digits", id="huge-integer"),
]


@pytest.mark.parametrize(("change", "reason"), MALFORMED_MANIFESTS)
def test_malformed_manifest_parts_are_refused(change: dict[str, Any], reason: str) -> None:
    """The parser's other rules, each on an otherwise valid manifest."""
    record = {"region": "encrypted", "size": 0, "mode": 0o644, "mtime_ns": 0,
              "object": "ab" * 16, "key": "cd" * 32}
    document: dict[str, Any] = {"chunk_size": 64, "generation": 1,
                                "regions": [["", "encrypted"]], "files": {}, "dirs": {}}
    for name, value in change.items():
        if name == "files":
            value = {path: {**record, **fields} for path, fields in value.items()}
        document[name] = value
    text = json.dumps(document).replace('"HUGE"', "9" * 5000)  # beyond int()'s limit
    with pytest.raises(InputError) as refused:
        Manifest.from_bytes(text.encode())
    assert refused.value.message.startswith(f"{NOT_A_MANIFEST}: ")
    assert reason in refused.value.message
    assert "\n" not in refused.value.message


# -- names in a source tree --------------------------------------------------------------------


@pytest.mark.parametrize(("name", "shown"), [
    ("ok.txt\nfake.txt", "ok.txt\\nfake.txt"),
    ("invoice\u202etxt.exe", "invoice\\u202etxt.exe"),
    ("isolate\u2066x", "isolate\\u2066x"),
    ("escape\x1b[2J", "escape\\x1b[2J"),
])
def test_source_names_with_controls_are_refused(tmp_path: Path, cli: CliRunner, name: str,
                                                shown: str) -> None:
    source = write_tree(tmp_path / "src", {"fine.txt": b"fine", f"sub/{name}": b"bad"})
    result = cli("volume", "create", tmp_path / "vol", "--from", source)
    assert_error(result, 3, shown)
    assert "U+" in result.err
    assert not (tmp_path / "vol").exists()

    made = cli("volume", "create", tmp_path / "vol2")
    key = made.out.splitlines()[0].removeprefix("key: ")
    tag = new_tag(made)
    before = snapshot(tmp_path / "vol2")
    result = cli("volume", "add", tmp_path / "vol2", source, "--key", key, "--tag", tag.hex())
    assert_error(result, 3, shown)
    assert snapshot(tmp_path / "vol2") == before


def test_truncate_then_grow_never_seals_a_chunk_twice_under_one_key(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A DApp's write, truncate, grow: chunk 1 was sealed once; it must not be again under
    that key (the host, watching the object, would see two ciphertexts under one nonce)."""
    sealed: list[tuple[bytes, int]] = []
    original = FileSealer.seal

    def recording(self: FileSealer, index: int, payload: Any, *, last: bool | None = None,
                  ) -> bytes:
        sealed.append((self._object_id, index))
        return original(self, index, payload, last=last)

    monkeypatch.setattr(FileSealer, "seal", recording)
    key = VolumeKey.generate()
    volume = Volume.create(tmp_path / "vol", key, chunk_size=4096)
    with volume.live() as live:
        live.create("/f", 0o644)
        live.write("/f", 8191, b"xy")  # chunk 1 is full and not last: sealed at once
        live.truncate("/f", 0)
        live.truncate("/f", 4097)
        tag = live.commit()
    assert len(sealed) == len(set(sealed)), sealed
    assert b"".join(Volume.open(tmp_path / "vol", key, tag).read("f")) == bytes(4097)


# -- the shield: a DApp's chmod 06755 ------------------------------------------------------------


@contextlib.contextmanager
def mounted(made: Made, mountpoint: Path) -> Iterator[list[str]]:
    """``tdapp volume mount`` in a child process; yields a list that receives its stdout."""
    mountpoint.mkdir()
    env = {**os.environ, "VOLUME_KEY": made.key.hex(), "VOLUME_TAG": made.tag.hex()}
    process = subprocess.Popen([sys.executable, "-m", "tdapp", "volume", "mount",
                                str(made.root), str(mountpoint)], env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    output: list[str] = []
    try:
        deadline = time.monotonic() + 30
        while not os.path.ismount(mountpoint):
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "the volume did not mount"
            time.sleep(0.02)
        yield output
    finally:
        subprocess.run(["fusermount3", "-u", str(mountpoint)], check=False, timeout=60)
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0, err
        output.append(out)


@pytest.mark.skipif(not fuse_usable(), reason="FUSE (/dev/fuse, fusermount3) is not usable")
def test_dapp_chmod_06755_and_odd_names_through_the_shield(make_volume: MakeVolume,
                                                         tmp_path: Path, cli: CliRunner) -> None:
    """What a DApp does to its output through the FUSE shield, run as root."""
    made = make_volume({"result.bin": b"result", "old": None})
    mnt = tmp_path / "mnt"
    with mounted(made, mnt) as output:
        os.chmod(mnt / "result.bin", 0o6755)
        fd = os.open(mnt / "dropper", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o4755)
        os.write(fd, b"#!/bin/sh\n")
        os.close(fd)
        os.mkdir(mnt / "shared")
        os.chmod(mnt / "shared", 0o3777)
        os.chmod(mnt / "old", 0o2755)
        assert special_bits(mnt) == {}  # not even the DApp sees them kept
        # Names the FSPF may not hold are refused when made, not sealed into the output.
        for name in ("ok.txt\nfake.txt", "invoice\u202etxt.exe"):
            with pytest.raises(OSError) as refused:
                (mnt / name).write_bytes(b"x")
            assert refused.value.errno == errno.EINVAL
            with pytest.raises(OSError):
                os.mkdir(mnt / name)
            with pytest.raises(OSError):
                os.rename(mnt / "result.bin", mnt / name)
    tag = VolumeTag.from_hex(output[0].strip().splitlines()[-1])
    manifest = open_fspf((made.root / "volume.fspf").read_bytes(), made.key, tag)
    assert manifest.files["result.bin"].mode == 0o755
    assert manifest.dirs["shared"].mode == 0o777
    out = tmp_path / "out"
    assert run(cli, "extract", made, out, tag).code == 0
    assert (out / "dropper").read_bytes() == b"#!/bin/sh\n"
    assert sorted(os.listdir(out)) == ["dropper", "old", "result.bin", "shared"]
    assert special_bits(out) == {}

"""The FUSE shield: volumes decrypted and verified as they are read.

Through ``tdapp volume mount`` with ordinary tools (listing, stat, rename,
truncate, append, random reads, a tampered chunk), then the walkthrough with
``tdapp run --shield fuse`` for the copy and the wordcount DApps, and a run
whose input has one flipped bit in one chunk.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from walk_fixtures import PYTHON_HOST, Walk, output_tag, push, running_up

from tdapp.runtime.mounts import fuse_usable
from tdapp.runtime.shield import MAX_IO, mount_device
from tdapp.volume import Volume, VolumeKey, VolumeTag
from tdapp.volume.fspf import TAG_SIZE

REPO = Path(__file__).resolve().parent.parent
CHUNK = 65536
pytestmark = [
    pytest.mark.skipif(not fuse_usable(), reason="FUSE (/dev/fuse, fusermount3) is not usable"),
    pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is missing"),
]


class Mounted:
    def __init__(self, volume: Path, mountpoint: Path, key: VolumeKey, tag: VolumeTag,
                 *extra: str) -> None:
        self.mountpoint = mountpoint
        mountpoint.mkdir(exist_ok=True)
        env = {**os.environ, "VOLUME_KEY": key.hex(), "VOLUME_TAG": tag.hex()}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tdapp", "volume", "mount", str(volume), str(mountpoint),
             *extra], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        while not os.path.ismount(mountpoint):
            assert self.process.poll() is None, self.process.communicate()
            assert time.monotonic() < deadline, "the volume did not mount"
            time.sleep(0.02)

    def unmount(self) -> tuple[int, str, str]:
        subprocess.run(["fusermount3", "-u", str(self.mountpoint)], check=True, timeout=60)
        out, err = self.process.communicate(timeout=120)
        return self.process.returncode, out, err


@pytest.fixture
def volume(tmp_path: Path) -> tuple[Path, VolumeKey, VolumeTag, bytes]:
    source = tmp_path / "src"
    (source / "docs").mkdir(parents=True)
    content = random.Random(7).randbytes(5 * CHUNK + 123)
    (source / "docs" / "big.bin").write_bytes(content)
    (source / "hello.txt").write_text("hello\n")
    key = VolumeKey.generate()
    created = Volume.create(tmp_path / "vol", key, source=source)
    return tmp_path / "vol", key, created.tag, content


def test_files_behave_as_a_program_expects(volume: tuple[Path, VolumeKey, VolumeTag, bytes],
                                           tmp_path: Path) -> None:
    folder, key, tag, content = volume
    mnt = tmp_path / "mnt"
    mounted = Mounted(folder, mnt, key, tag)
    try:
        assert sorted(os.listdir(mnt)) == ["docs", "hello.txt"]
        assert (mnt / "docs" / "big.bin").stat().st_size == len(content)
        with open(mnt / "docs" / "big.bin", "rb") as handle:
            for offset in random.Random(1).sample(range(len(content) - 4096), 200):
                handle.seek(offset)
                assert handle.read(4096) == content[offset:offset + 4096]
        with open(mnt / "hello.txt", "a") as handle:
            handle.write("again\n")
        (mnt / "docs" / "big.bin").rename(mnt / "docs" / "moved.bin")
        with open(mnt / "docs" / "moved.bin", "r+b") as handle:
            handle.seek(CHUNK + 5)
            handle.write(b"XYZ")  # inside a chunk sealed before: a fresh key for the file
            handle.truncate(3 * CHUNK)
        os.mkdir(mnt / "new")
        (mnt / "new" / "n.txt").write_bytes(b"n" * (2 * CHUNK + 1))
        os.remove(mnt / "hello.txt")
        (mnt / "hello.txt").write_text("hello\nagain\n")
        with pytest.raises(OSError) as refused:
            os.symlink("/etc/passwd", mnt / "link")
        assert refused.value.errno == 1  # EPERM: a volume holds no links
        with pytest.raises(IsADirectoryError):
            (mnt / "new").read_bytes()
        with pytest.raises(OSError) as not_empty:
            os.rmdir(mnt / "new")
        assert not_empty.value.errno == 39  # ENOTEMPTY
    finally:
        code, out, err = mounted.unmount()
    assert code == 0, err
    new_tag = VolumeTag.from_hex(out.strip())
    assert new_tag != tag
    expected = bytearray(content[:3 * CHUNK])
    expected[CHUNK + 5:CHUNK + 8] = b"XYZ"
    reopened = Volume.open(folder, key, new_tag)
    reopened.verify()
    assert b"".join(reopened.read("docs/moved.bin")) == bytes(expected)
    assert b"".join(reopened.read("hello.txt")) == b"hello\nagain\n"
    assert b"".join(reopened.read("new/n.txt")) == b"n" * (2 * CHUNK + 1)
    assert {info.path for info in reopened.files()} == {"docs/moved.bin", "hello.txt",
                                                         "new/n.txt"}
    with pytest.raises(Exception, match="tag mismatch"):
        Volume.open(folder, key, tag)  # the old tag is a rollback now


def test_a_flipped_bit_is_eio_and_the_mount_names_file_and_chunk(
        volume: tuple[Path, VolumeKey, VolumeTag, bytes], tmp_path: Path) -> None:
    folder, key, tag, content = volume
    objects = sorted((folder / "objects").iterdir(), key=lambda p: p.stat().st_size)
    big = objects[-1]
    data = bytearray(big.read_bytes())
    data[2 * (CHUNK + TAG_SIZE) + 100] ^= 0x01
    big.write_bytes(bytes(data))
    mnt = tmp_path / "mnt"
    mounted = Mounted(folder, mnt, key, tag, "--read-only")
    try:
        with open(mnt / "docs" / "big.bin", "rb") as handle:
            assert handle.read(CHUNK) == content[:CHUNK]  # chunk 0 is intact
            handle.seek(2 * CHUNK)
            with pytest.raises(OSError) as failed:
                handle.read(10)
            assert failed.value.errno == 5  # EIO, never wrong bytes
        with pytest.raises(OSError):
            (mnt / "hello.txt").write_text("x")  # read-only
    finally:
        code, _, err = mounted.unmount()
    assert code == 4
    assert "chunk 2 of docs/big.bin failed authentication" in err


@pytest.fixture(scope="module")
def walk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Walk]:
    with running_up(tmp_path_factory.mktemp("walk")) as started:
        started.tdapp("build", str(REPO / "examples" / "copy_dapp"), "--name", "copy_demo",
                      "-o", str(started.example / "KEYS" / "copy_dapp.yml"))
        started.tdapp("build", str(REPO / "examples" / "wordcount"), "--name", "wordcount",
                      "-o", str(started.example / "KEYS" / "wordcount.yml"), "--entrypoint",
                      "/usr/bin/python3 -I /wordcount.py", "--heap", "512M", *PYTHON_HOST)
        yield started


def fetch_and_decrypt(walk: Walk, url: str) -> Path:
    zips, outputs = walk.example / "ZIP", walk.example / "OUTPUTS"
    for old in zips.iterdir():
        old.unlink()
    subprocess.run(["curl", "--silent", "--show-error", "--fail", "--output",
                    str(zips / "out.zip"), url], check=True, timeout=60)
    shutil.rmtree(outputs)
    outputs.mkdir()
    walk.tdapp("decrypt")
    return outputs


def test_the_copy_dapp_walkthrough_with_the_fuse_shield(walk: Walk) -> None:
    command = push(walk, {"f1.txt": "Hello world\n", "f2.txt": "Hello together\n"})
    done = walk.tdapp("run", "copy_demo", *command, "--push", walk.push, "--shield", "fuse")
    assert "mounted by the FUSE shield" in done.stderr
    outputs = fetch_and_decrypt(walk, done.stdout.strip())
    assert (outputs / "f1.txt").read_text() == "Hello world\n"
    assert (outputs / "f2.txt").read_text() == "Hello together\n"
    again = walk.tdapp("run", "copy_demo", *command, "--push", walk.push, "--shield", "fuse",
                       check=False)
    assert again.returncode == 4 and "tag mismatch (rollback or tampering)" in again.stderr


def test_the_wordcount_dapp_with_the_fuse_shield(walk: Walk) -> None:
    block = "trusted dapps keep secrets été\n" * 1000
    command = push(walk, {"a.txt": block * 20, "b.txt": block}, "wordcount", "wordcount.yml")
    url = walk.tdapp("run", "wordcount", *command, "--push", walk.push,
                     "--shield", "fuse").stdout.strip()
    counts = dict(line.split("\t") for line in (fetch_and_decrypt(walk, url) / "counts.tsv")
                  .read_text(encoding="utf-8").splitlines())
    assert {word: int(n) for word, n in counts.items()} == {
        word: 21000 for word in ("trusted", "dapps", "keep", "secrets", "été")}


def test_a_flipped_bit_in_an_input_chunk_fails_the_run_naming_file_and_chunk(
        walk: Walk, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    content = "word " * (3 * CHUNK // 5)
    command = push(walk, {"data.txt": content}, "wordcount", "wordcount.yml")
    before = output_tag(walk, monkeypatch)
    url = command[command.index("--url") + 1]
    original, tampered = tmp_path / "in.zip", tmp_path / "tampered.zip"
    subprocess.run(["curl", "--silent", "--fail", "--output", str(original), url], check=True,
                   timeout=60)
    with zipfile.ZipFile(original) as source, zipfile.ZipFile(tampered, "w") as target:
        for item in source.infolist():
            data = bytearray(source.read(item))
            if "encrypted-input-files/objects/" in item.filename and len(data) > 2 * CHUNK:
                data[CHUNK + TAG_SIZE + 7] ^= 0x01  # chunk 1 of data.txt
            target.writestr(item, bytes(data))
    from tdapp.transfer import upload

    command[command.index("--url") + 1] = upload(tampered, walk.push)
    done = walk.tdapp("run", "wordcount", *command, "--push", walk.push, "--shield", "fuse",
                      check=False)
    assert done.returncode == 4 and done.stdout == "", done.stderr
    assert ("volume encrypted-input-files: chunk 1 of data.txt failed authentication"
            in done.stderr.strip().splitlines()[-1])
    assert output_tag(walk, monkeypatch) == before


def test_sigterm_unmounts_and_seals_what_was_written(
        volume: tuple[Path, VolumeKey, VolumeTag, bytes], tmp_path: Path) -> None:
    folder, key, tag, _ = volume
    mnt = tmp_path / "mnt"
    mounted = Mounted(folder, mnt, key, tag)
    (mnt / "late.txt").write_text("written before SIGTERM\n")
    mounted.process.terminate()
    out, err = mounted.process.communicate(timeout=120)
    assert mounted.process.returncode == 0, err
    assert not os.path.ismount(mnt)
    reopened = Volume.open(folder, key, VolumeTag.from_hex(out.strip()))
    assert b"".join(reopened.read("late.txt")) == b"written before SIGTERM\n"


def test_a_relative_report_path_is_written_where_it_was_named(
        volume: tuple[Path, VolumeKey, VolumeTag, bytes], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """libfuse changes the working folder to / once mounted; --report rep.json still lands in
    the folder the command was started from, not at /rep.json."""
    folder, key, tag, _ = volume
    monkeypatch.chdir(tmp_path)
    stray = Path("/rep-relative-test.json")
    assert not stray.exists()
    mounted = Mounted(folder, tmp_path / "mnt", key, tag, "--report", stray.name)
    code, out, err = mounted.unmount()
    assert code == 0, err
    written = json.loads((tmp_path / stray.name).read_text())
    assert written["tag"] == out.strip() and written["failures"] == []
    assert not stray.exists()


def test_a_mount_reads_ahead_a_whole_request_even_at_a_path_with_a_space(
        volume: tuple[Path, VolumeKey, VolumeTag, bytes], tmp_path: Path) -> None:
    """The kernel's 128 KiB read-ahead would cut every large read into 128 KiB round trips;
    as root the shield raises its own mount's to MAX_IO (found in mountinfo, which escapes
    a space as \\040), and the files read as before."""
    folder, key, tag, content = volume
    mounted = Mounted(folder, tmp_path / "m n t", key, tag, "--read-only")
    try:
        device = mount_device(mounted.mountpoint)
        number = os.stat(mounted.mountpoint).st_dev
        assert device == f"{os.major(number)}:{os.minor(number)}"
        if os.geteuid() == 0:
            setting = Path(f"/sys/class/bdi/{device}/read_ahead_kb").read_text()
            assert int(setting) == MAX_IO // 1024
        assert (mounted.mountpoint / "docs" / "big.bin").read_bytes() == content
    finally:
        code, out, err = mounted.unmount()
    assert code == 0, err
    assert out.strip() == tag.hex()

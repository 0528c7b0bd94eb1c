"""Attacks on the FUSE shield: another local user reading every process's command line and
environment while a volume is mounted, crafted ``--key-fd`` input, and the store rewriting
chunks under a mount after some were read (and cached)."""

from __future__ import annotations

import errno
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tdapp.runtime.mounts import ShieldMount, fuse_usable, key_message
from tdapp.volume import Volume, VolumeKey, VolumeTag

pytestmark = pytest.mark.skipif(
    not fuse_usable() or shutil.which("fusermount3") is None,
    reason="FUSE (/dev/fuse, fusermount3) is not usable")


@pytest.fixture
def volume(tmp_path: Path) -> tuple[Path, VolumeKey, VolumeTag]:
    source = tmp_path / "src"
    source.mkdir()
    (source / "hello.txt").write_text("hello through the shield\n")
    key = VolumeKey.generate()
    created = Volume.create(tmp_path / "vol", key, source=source)
    return tmp_path / "vol", key, created.tag


def everything_in_proc() -> list[tuple[int, bytes]]:
    """(pid, cmdline + environ) of every process, as root sees them."""
    seen = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                seen.append((int(entry.name), (entry / "cmdline").read_bytes()
                             + b"\n" + (entry / "environ").read_bytes()))
            except OSError:
                continue  # ended meanwhile
    return seen


def test_the_key_is_in_no_command_line_or_environment_while_mounted(
        volume: tuple[Path, VolumeKey, VolumeTag], tmp_path: Path) -> None:
    folder, key, tag = volume
    mount = ShieldMount("data", folder, tmp_path / "mnt" / "data", key.hex(), tag.hex())
    try:
        assert (mount.mountpoint / "hello.txt").read_text() == "hello through the shield\n"
        processes = everything_in_proc()
        assert any(b"volume\0mount" in text for _, text in processes)  # it sees the child
        for pid, text in processes:
            assert key.hex().encode() not in text.lower(), f"the key is visible in /proc/{pid}"
            assert key.hex().upper().encode() not in text, f"the key is visible in /proc/{pid}"
        report = mount.finish()
    finally:
        mount.abort()
    assert report.tag == tag and report.failures == []


def mount_with_key_fd(folder: Path, mountpoint: Path, message: bytes,
                      *extra: str) -> subprocess.CompletedProcess[str]:
    mountpoint.mkdir(exist_ok=True)
    read_end, write_end = os.pipe()
    os.write(write_end, message)
    os.close(write_end)
    try:
        environment = {k: v for k, v in os.environ.items() if not k.startswith("VOLUME_")}
        return subprocess.run(
            [sys.executable, "-m", "tdapp", "volume", "mount", str(folder), str(mountpoint),
             "--key-fd", str(read_end), *extra], pass_fds=[read_end], env=environment,
            capture_output=True, text=True, timeout=60)
    finally:
        os.close(read_end)


@pytest.mark.parametrize("message", [
    b"",
    b"VOLUME_KEY=00\nVOLUME_TAG=00\n",
    b"VOLUME_KEY=" + b"a" * 64 + b"\n",
    b"VOLUME_KEY=" + b"a" * 64 + b"\nVOLUME_KEY=" + b"a" * 64 + b"\n",
    b"x" * 10000,
])
def test_a_crafted_key_descriptor_is_one_clear_line_and_mounts_nothing(
        volume: tuple[Path, VolumeKey, VolumeTag], tmp_path: Path, message: bytes) -> None:
    folder, _, _ = volume
    before = sorted((p.relative_to(folder), p.read_bytes()) for p in folder.rglob("*")
                    if p.is_file())
    done = mount_with_key_fd(folder, tmp_path / "mnt", message)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tdapp: error: "), done.stderr
    assert "Traceback" not in done.stderr
    assert not os.path.ismount(tmp_path / "mnt")
    assert sorted((p.relative_to(folder), p.read_bytes()) for p in folder.rglob("*")
                  if p.is_file()) == before


def test_a_key_descriptor_and_a_key_option_together_are_refused(
        volume: tuple[Path, VolumeKey, VolumeTag], tmp_path: Path) -> None:
    folder, key, tag = volume
    done = mount_with_key_fd(folder, tmp_path / "mnt", key_message(key, tag),
                             "--key", key.hex())
    assert done.returncode == 2
    assert "not both" in done.stderr and key.hex() not in done.stderr
    assert not os.path.ismount(tmp_path / "mnt")


CHUNK, SEALED = 65536, 65536 + 16


def test_the_store_changing_chunks_under_a_mount_never_reaches_the_program(
        tmp_path: Path) -> None:
    """The store is hostile and may rewrite a sealed object while it is mounted. A chunk
    read (and authenticated) before the change may be served again from memory, as it
    was; one first read after the change is EIO and fails the mount, named."""
    source = tmp_path / "src"
    source.mkdir()
    content = random.Random(3).randbytes(40 * CHUNK)  # well past one read-ahead
    (source / "big.bin").write_bytes(content)
    key = VolumeKey.generate()
    folder = tmp_path / "vol"
    tag = Volume.create(folder, key, source=source).tag
    (stored,) = (folder / "objects").iterdir()
    mount = ShieldMount("data", folder, tmp_path / "mnt" / "data", key.hex(), tag.hex())
    try:
        fd = os.open(mount.mountpoint / "big.bin", os.O_RDONLY)
        try:
            assert os.pread(fd, CHUNK, 0) == content[:CHUNK]
            with open(stored, "r+b") as store:  # in place: the mount has the object open
                for index in (0, 30):
                    store.seek(index * SEALED + 5)
                    store.write(bytes([content[index * CHUNK + 5] ^ 0xFF]))
            try:
                again = os.pread(fd, CHUNK, 0)
            except OSError as error:
                assert error.errno == errno.EIO
            else:
                assert again == content[:CHUNK]  # the authenticated bytes, kept
            with pytest.raises(OSError) as refused:
                os.pread(fd, CHUNK, 30 * CHUNK)
            assert refused.value.errno == errno.EIO  # never the store's bytes
        finally:
            os.close(fd)
        report = mount.finish()
    finally:
        mount.abort()
    assert report.tag == tag
    assert "chunk 30 of big.bin failed authentication" in report.failures

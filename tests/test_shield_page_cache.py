"""A small read on a read-only shield mount puts the rest of its authenticated chunk into the
kernel's page cache, and nothing that failed authentication or might change gets there.

Residency is read with ``mincore`` on a mapping of the mounted file: the kernel answers
for its page cache, whoever filled it.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import random
import threading
import time
from pathlib import Path

import pytest
from test_shield import CHUNK, Mounted, pytestmark  # noqa: F401  (the FUSE skips apply here)

from tdapp.volume import Volume, VolumeKey, VolumeTag
from tdapp.volume.fspf import TAG_SIZE

PAGE = mmap.PAGESIZE
_libc = ctypes.CDLL(None, use_errno=True)


def resident_pages(path: Path) -> list[bool]:
    """Which pages of ``path`` are in the page cache (mapping the file faults none in)."""
    size = path.stat().st_size
    with open(path, "rb") as file, mmap.mmap(file.fileno(), size, access=mmap.ACCESS_COPY) as m:
        pages = -(-size // PAGE)
        vector = (ctypes.c_ubyte * pages)()
        address = ctypes.addressof(ctypes.c_char.from_buffer(m))
        try:
            if _libc.mincore(ctypes.c_void_p(address), ctypes.c_size_t(size), vector) != 0:
                raise OSError(ctypes.get_errno(), "mincore")
        finally:
            del address
        return [bool(flag & 1) for flag in vector]


def small_read(path: Path, offset: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no readahead: just this page
        return os.pread(fd, PAGE, offset)
    finally:
        os.close(fd)


def wait_for(condition: object, what: str) -> None:
    deadline = time.monotonic() + 20
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


@pytest.fixture
def volume(tmp_path: Path) -> tuple[Path, VolumeKey, VolumeTag, bytes]:
    source = tmp_path / "src"
    source.mkdir()
    content = random.Random(11).randbytes(4 * CHUNK + 5000)  # the last chunk ends mid-page
    (source / "data.bin").write_bytes(content)
    key = VolumeKey.generate()
    return tmp_path / "vol", key, Volume.create(tmp_path / "vol", key, source=source).tag, content


def chunk_pages(index: int, size: int) -> range:
    return range(index * CHUNK // PAGE, min(-(-size // PAGE), (index + 1) * CHUNK // PAGE))


def test_a_small_read_fills_the_page_cache_with_its_whole_chunk(
        volume: tuple[Path, VolumeKey, VolumeTag, bytes], tmp_path: Path) -> None:
    folder, key, tag, content = volume
    mounted = Mounted(folder, tmp_path / "mnt", key, tag, "--read-only")
    try:
        path = mounted.mountpoint / "data.bin"
        offset = CHUNK + 3 * PAGE
        assert small_read(path, offset) == content[offset:offset + PAGE]
        wait_for(lambda: all(resident_pages(path)[page] for page in chunk_pages(1, len(content))),
                 "the rest of chunk 1 never reached the page cache")
        resident = resident_pages(path)
        assert not any(resident[page] for page in chunk_pages(0, len(content)))
        assert not any(resident[page] for page in chunk_pages(2, len(content)))
        # the last chunk ends inside a page: pushed whole too, and read back exactly
        last = 4 * CHUNK + 100
        assert small_read(path, last - last % PAGE) == content[last - last % PAGE:][:PAGE]
        wait_for(lambda: all(resident_pages(path)[page] for page in chunk_pages(4, len(content))),
                 "the last chunk never reached the page cache")
        assert path.read_bytes() == content
        for page_offset in range(0, len(content), PAGE):  # each page, cached or not
            assert small_read(path, page_offset) == content[page_offset:page_offset + PAGE]
    finally:
        code, out, err = mounted.unmount()
    assert code == 0, err
    assert out.strip() == tag.hex()


def test_a_chunk_that_fails_authentication_puts_nothing_in_the_page_cache(
        volume: tuple[Path, VolumeKey, VolumeTag, bytes], tmp_path: Path) -> None:
    """The host rewrites one sealed chunk: a small read in it is EIO, and none of its pages,
    nor any other, is cached from it; a good chunk next to it still reads and is pushed."""
    folder, key, tag, content = volume
    (stored,) = (folder / "objects").iterdir()
    with open(stored, "r+b") as file:  # flip one byte in chunk 2's ciphertext
        file.seek(2 * (CHUNK + TAG_SIZE) + 1000)
        byte = file.read(1)
        file.seek(-1, os.SEEK_CUR)
        file.write(bytes([byte[0] ^ 1]))
    mounted = Mounted(folder, tmp_path / "mnt", key, tag, "--read-only")
    try:
        path = mounted.mountpoint / "data.bin"
        with pytest.raises(OSError) as refused:
            small_read(path, 2 * CHUNK + PAGE)
        assert refused.value.errno == 5  # EIO
        assert small_read(path, 3 * CHUNK) == content[3 * CHUNK:3 * CHUNK + PAGE]
        wait_for(lambda: all(resident_pages(path)[page] for page in chunk_pages(3, len(content))),
                 "the good chunk never reached the page cache")
        resident = resident_pages(path)
        assert not any(resident[page] for page in chunk_pages(2, len(content)))
    finally:
        code, _, err = mounted.unmount()
    assert code == 1 or "failed authentication" in err


def test_a_writable_mount_pushes_nothing(
        volume: tuple[Path, VolumeKey, VolumeTag, bytes], tmp_path: Path) -> None:
    """Where files can change, a late push could put older bytes over newer ones: none."""
    folder, key, tag, content = volume
    mounted = Mounted(folder, tmp_path / "mnt", key, tag)
    try:
        path = mounted.mountpoint / "data.bin"
        assert small_read(path, CHUNK) == content[CHUNK:CHUNK + PAGE]
        # a read of the next chunk, answered after any push of chunk 1 would have been
        assert small_read(path, 2 * CHUNK) == content[2 * CHUNK:2 * CHUNK + PAGE]
        time.sleep(0.3)
        resident = resident_pages(path)
        assert resident[CHUNK // PAGE]
        assert not any(resident[page] for page in chunk_pages(1, len(content))[1:])
    finally:
        code, _, err = mounted.unmount()
    assert code == 0, err


def test_concurrent_small_and_large_reads_see_the_content_and_never_hang(tmp_path: Path) -> None:
    """Pushes land while other reads hold their pages locked (readahead, several readers):
    every reader gets the file's bytes and the mount unmounts."""
    source = tmp_path / "src"
    source.mkdir()
    content = random.Random(5).randbytes(64 * CHUNK + 777)
    (source / "data.bin").write_bytes(content)
    key = VolumeKey.generate()
    tag = Volume.create(tmp_path / "vol", key, source=source).tag
    mounted = Mounted(tmp_path / "vol", tmp_path / "mnt", key, tag, "--read-only")
    problems: list[str] = []

    def reader(seed: int, advice: int) -> None:
        rng = random.Random(seed)
        fd = os.open(mounted.mountpoint / "data.bin", os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, advice)
            for _ in range(300):
                offset, size = rng.randrange(len(content)), rng.choice((1, 100, PAGE, 3 * PAGE))
                if os.pread(fd, size, offset) != content[offset:offset + size]:
                    problems.append(f"wrong bytes at {offset}+{size}")
        except OSError as error:
            problems.append(str(error))
        finally:
            os.close(fd)

    def whole() -> None:
        for _ in range(3):
            if (mounted.mountpoint / "data.bin").read_bytes() != content:
                problems.append("a whole read differed")

    threads = [threading.Thread(target=reader, args=(seed, advice)) for seed, advice in
               ((1, os.POSIX_FADV_RANDOM), (2, os.POSIX_FADV_RANDOM), (3, os.POSIX_FADV_NORMAL),
                (4, os.POSIX_FADV_SEQUENTIAL))] + [threading.Thread(target=whole)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert not any(thread.is_alive() for thread in threads), "a read hung"
        assert problems == []
    finally:
        code, out, err = mounted.unmount()
    assert code == 0, err
    assert out.strip() == tag.hex()

"""The overlapped read / seal-or-open / write pipeline of large files (volume/pipeline.py).

A file of more than two batches goes through a reader thread and a writer thread. These
tests break it in the middle, as a failing disk, a changing source or a tampered object
would, and check the effects: nothing is published, no plaintext of a bad chunk comes
out, and no thread of the pipeline is left running.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import CliResult, MakeVolume, assert_error, snapshot, write_tree

from tdapp.errors import InputError, IntegrityError
from tdapp.volume import Volume, VolumeKey
from tdapp.volume.chunks import (
    FileSealer,
    batch_chunks,
    new_object_id_and_key,
    open_stream,
    pipelined,
    seal_stream,
    stored_size,
)
from tdapp.volume.fspf import FileEntry
from tdapp.volume.pipeline import ReadAhead, WriteBehind
from tdapp.volume.regions import RegionKind

C = 64  # chunk size: a batch is batch_chunks(C) chunks, 16 KiB
BATCH = batch_chunks(C) * C
STORED_CHUNK = C + 16
BIG = "big.bin"
SIZE = 7 * BATCH + 123  # eight batches, the last one short
CONTENT = os.urandom(SIZE)


def pipeline_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name.startswith("tdapp-")]


@pytest.fixture(autouse=True)
def _no_thread_left() -> Iterator[None]:
    assert not pipeline_threads()
    yield
    assert not pipeline_threads(), "a pipeline thread outlived its operation"


def test_the_big_file_really_goes_through_the_pipeline() -> None:
    assert pipelined(SIZE, C)
    assert not pipelined(2 * BATCH, C)


def test_round_trip_through_the_pipeline(make_volume: MakeVolume, tmp_path: Path) -> None:
    made = make_volume({BIG: CONTENT, "small.txt": b"small"}, chunk_size=C)
    assert made.object_path(BIG).stat().st_size == stored_size(SIZE, C)
    opened = Volume.open(made.root, made.key, made.tag)
    assert b"".join(opened.read(BIG)) == CONTENT
    opened.extract(tmp_path / "out")
    assert (tmp_path / "out" / BIG).read_bytes() == CONTENT


def test_failure_in_the_middle_of_create_publishes_nothing(tmp_path: Path) -> None:
    """A failure with batches still queued: no volume, no object, no thread left."""
    source = write_tree(tmp_path / "src", {BIG: CONTENT})
    seen: list[int] = []

    def fail_halfway(done: int) -> None:
        seen.append(done)
        if sum(seen) > SIZE // 2:
            raise OSError(28, "No space left on device")

    root = tmp_path / "vol"
    with pytest.raises(OSError, match="No space left"):
        Volume.create(root, VolumeKey.generate(), source=source, chunk_size=C,
                      progress=fail_halfway)
    assert not root.exists()


def test_failure_in_the_middle_of_add_keeps_the_old_volume(make_volume: MakeVolume,
                                                            tmp_path: Path) -> None:
    made = make_volume({"a.txt": b"before"}, chunk_size=C)
    objects_before = set(os.listdir(made.root / "objects"))
    source = write_tree(tmp_path / "more", {BIG: CONTENT})
    opened = Volume.open(made.root, made.key, made.tag)

    def interrupt(done: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        opened.add(source, progress=interrupt)
    assert set(os.listdir(made.root / "objects")) == objects_before
    again = Volume.open(made.root, made.key, made.tag)  # the old tag still opens it
    assert [info.path for info in again.files()] == ["a.txt"]


def test_a_write_error_in_the_writer_thread_reaches_the_caller(tmp_path: Path) -> None:
    read_only = os.open(tmp_path / "target", os.O_RDONLY | os.O_CREAT, 0o600)
    try:
        with pytest.raises(OSError) as raised, WriteBehind(read_only, depth=1) as writer:
            for _ in range(10):
                writer.write([b"x" * 1024])
            writer.finish()
        assert raised.value.errno == 9  # EBADF: the fd is not open for writing
    finally:
        os.close(read_only)
    assert os.path.getsize(tmp_path / "target") == 0


def test_a_read_error_in_the_reader_thread_reaches_the_caller(tmp_path: Path) -> None:
    write_only = os.open(tmp_path / "source", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with pytest.raises(OSError) as raised, \
                ReadAhead(write_only, [16] * 4, 16, buffers=2) as reader:
            list(reader)
        assert raised.value.errno == 9
    finally:
        os.close(write_only)


def test_leaving_early_stops_the_reader(tmp_path: Path) -> None:
    (tmp_path / "source").write_bytes(b"y" * 64 * 100)
    fd = os.open(tmp_path / "source", os.O_RDONLY)
    try:
        with ReadAhead(fd, [64] * 100, 64, buffers=2) as reader:
            for view in reader:
                assert bytes(view) == b"y" * 64
                break
    finally:
        os.close(fd)


@pytest.mark.parametrize(("change", "message"), [(+1, "grew"), (-1, "shrank")])
def test_a_source_that_changes_size_is_refused(tmp_path: Path, change: int,
                                               message: str) -> None:
    """seal_stream is told the size the scan saw; the file now has one byte more or less."""
    (tmp_path / "source").write_bytes(CONTENT[: SIZE + min(change, 0)] + b"z" * max(change, 0))
    object_id, key = new_object_id_and_key()
    sealer = FileSealer(BIG, FileEntry(RegionKind.ENCRYPTED, SIZE, 0o644, 0, object_id, key), C)
    source = os.open(tmp_path / "source", os.O_RDONLY)
    target = os.open(tmp_path / "target", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with pytest.raises(InputError, match=f"{BIG} {message} while it was being read"):
            seal_stream(source, target, sealer, SIZE, lambda _: None)
    finally:
        os.close(source)
        os.close(target)


# -- a tampered chunk in the middle of a pipelined file -----------------------------------

BAD = 3 * batch_chunks(C) + 5  # a chunk in the fourth batch


def _tampered(make_volume: MakeVolume) -> tuple[Path, Volume]:
    made = make_volume({BIG: CONTENT}, chunk_size=C)
    path = made.object_path(BIG)
    with path.open("r+b") as handle:
        handle.seek(BAD * STORED_CHUNK + 7)
        byte = handle.read(1)
        handle.seek(BAD * STORED_CHUNK + 7)
        handle.write(bytes([byte[0] ^ 1]))
    return path, Volume.open(made.root, made.key, made.tag)


def test_read_yields_every_good_chunk_and_never_the_bad_one(make_volume: MakeVolume) -> None:
    _, opened = _tampered(make_volume)
    chunks: list[bytes] = []
    with pytest.raises(IntegrityError, match=f"chunk {BAD} of {BIG} failed authentication"):
        chunks.extend(opened.read(BIG))
    assert b"".join(chunks) == CONTENT[: BAD * C]


def test_stream_of_a_bad_object_stops_its_reader(make_volume: MakeVolume) -> None:
    """Abandoning the stream after the failure leaves no thread reading the object."""
    path, opened = _tampered(make_volume)
    sealer = FileSealer(BIG, opened._manifest.files[BIG], C)
    fd = os.open(path, os.O_RDONLY)
    try:
        stream = open_stream(fd, sealer, SIZE)
        with pytest.raises(IntegrityError):
            for _ in stream:
                pass
    finally:
        os.close(fd)


def test_extract_of_a_bad_chunk_leaves_the_target_as_it_was(make_volume: MakeVolume,
                                                            tmp_path: Path) -> None:
    _, opened = _tampered(make_volume)
    out = write_tree(tmp_path / "out", {"keep.txt": b"mine"})
    before = snapshot(out)
    written: list[int] = []
    with pytest.raises(IntegrityError, match=f"chunk {BAD} of {BIG}"):
        opened.extract(out, progress=written.append)
    assert snapshot(out) == before
    assert sum(written) <= BAD * C  # nothing of the bad chunk (or after it) was written


def test_cli_extract_of_a_bad_chunk_is_one_clear_error(
        make_volume: MakeVolume, tmp_path: Path, cli: Callable[..., CliResult]) -> None:
    made = make_volume({BIG: CONTENT}, chunk_size=C)
    path = made.object_path(BIG)
    data = bytearray(path.read_bytes())
    data[BAD * STORED_CHUNK] ^= 1
    path.write_bytes(bytes(data))
    result = cli("volume", "extract", made.root, tmp_path / "new", *made.key_args())
    assert_error(result, 4, f"chunk {BAD} of {BIG} failed authentication")
    assert not (tmp_path / "new").exists()

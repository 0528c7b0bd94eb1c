"""A 1 GiB file goes through ``create`` and ``extract`` in bounded memory (streamed by chunk).

Large files go through a read-ahead / write-behind pipeline (volume/pipeline.py) that holds
a few batches at once; with big chunks a batch is one chunk, so the second test checks that
the pipeline holds no more than a few chunks above what the program needs anyway.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

GIB = 1024 * 1024 * 1024
BLOCK = 1024 * 1024
LIMIT_KIB = 100 * 1024  # 100 MiB, in the unit of ru_maxrss on Linux
NEEDED = 2 * GIB + 256 * 1024 * 1024  # the volume and the extracted copy, never the source too

# Runs its arguments as one child and reports that child's peak RSS: RUSAGE_CHILDREN of a
# fresh process covers exactly the children it waited for, here only one.
MEASURE = (
    "import resource, subprocess, sys\n"
    "code = subprocess.run(sys.argv[1:]).returncode\n"
    "peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
    "print(f'peak-rss-kib={peak}', file=sys.stderr)\n"
    "sys.exit(code)\n"
)


@pytest.fixture
def big_dir(tmp_path: Path) -> Iterator[Path]:
    """A scratch folder in memory (/dev/shm) if there is room, else on disk; removed after."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > NEEDED:
        base = Path(tempfile.mkdtemp(prefix="tdapp-memory-", dir=shm))
    else:
        base = tmp_path / "big"
        base.mkdir()
    if shutil.disk_usage(base).free < NEEDED:
        shutil.rmtree(base, ignore_errors=True)
        pytest.skip(f"needs {NEEDED} free bytes for the 1 GiB memory test")
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def measured(*args: str | Path, env: dict[str, str] | None = None) -> tuple[str, int]:
    """Run ``python -m tdapp ARGS``; return its stdout and its own peak RSS in KiB."""
    environment = {**os.environ, **(env or {})}
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, sys.executable, "-m", "tdapp", *map(str, args)],
        capture_output=True, text=True, env=environment, timeout=280, check=False)
    assert done.returncode == 0, done.stderr
    match = re.search(r"^peak-rss-kib=(\d+)$", done.stderr, re.MULTILINE)
    assert match, done.stderr
    return done.stdout, int(match.group(1))


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(BLOCK):
            digest.update(block)
    return digest.hexdigest()


def test_one_gib_file_in_bounded_memory(big_dir: Path) -> None:
    source = big_dir / "src"
    source.mkdir()
    expected = hashlib.sha256()
    block = os.urandom(BLOCK)
    with (source / "big.bin").open("wb") as handle:
        for index in range(GIB // BLOCK):
            # vary each block a little so that a misplaced chunk would change the hash
            piece = index.to_bytes(4, "big") + block[4:]
            handle.write(piece)
            expected.update(piece)
    (source / "small.txt").write_bytes(b"small")

    out, create_peak = measured("volume", "create", big_dir / "vol", "--from", source,
                                "--envar-output")
    lines = out.splitlines()
    assert len(lines) == 2
    env = dict(line.removeprefix("export ").split("=", 1) for line in lines)
    objects = list((big_dir / "vol" / "objects").iterdir())
    assert len(objects) == 2
    assert max(path.stat().st_size for path in objects) > GIB  # really stored, with tags
    shutil.rmtree(source)  # keep at most two copies on /dev/shm

    _, extract_peak = measured("volume", "extract", big_dir / "vol", big_dir / "out", env=env)
    extracted = big_dir / "out" / "big.bin"
    assert extracted.stat().st_size == GIB
    assert sha256_of(extracted) == expected.hexdigest()
    assert (big_dir / "out" / "small.txt").read_bytes() == b"small"

    print(f"peak RSS: create {create_peak} KiB, extract {extract_peak} KiB")
    assert 0 < create_peak < LIMIT_KIB, f"create peaked at {create_peak} KiB"
    assert 0 < extract_peak < LIMIT_KIB, f"extract peaked at {extract_peak} KiB"


BIG_CHUNK = 16 * 1024 * 1024
MOST_CHUNKS_IN_FLIGHT = 6  # the pipeline's bound is 5 (see chunks.pipeline_depths)


def test_big_chunks_keep_only_a_few_chunks_in_memory(big_dir: Path) -> None:
    source = big_dir / "src"
    source.mkdir()
    block = os.urandom(BLOCK)
    with (source / "big.bin").open("wb") as handle:
        for index in range(256):
            handle.write(index.to_bytes(4, "big") + block[4:])
    _, baseline = measured("volume", "--help")
    out, create_peak = measured("volume", "create", big_dir / "vol", "--from", source,
                                "--chunk-size", str(BIG_CHUNK), "--envar-output")
    env = dict(line.removeprefix("export ").split("=", 1) for line in out.splitlines())
    _, extract_peak = measured("volume", "extract", big_dir / "vol", big_dir / "out", env=env)
    assert sha256_of(big_dir / "out" / "big.bin") == sha256_of(source / "big.bin")
    limit = baseline + MOST_CHUNKS_IN_FLIGHT * BIG_CHUNK // 1024
    print(f"peak RSS: baseline {baseline}, create {create_peak}, extract {extract_peak} KiB")
    assert create_peak < limit, f"create peaked at {create_peak} KiB (limit {limit})"
    assert extract_peak < limit, f"extract peaked at {extract_peak} KiB (limit {limit})"

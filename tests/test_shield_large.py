"""A 4 GiB input through the FUSE shield: the wordcount DApp counts it in a 512 MiB heap.

Slow (``make test-slow``; several minutes): the walkthrough of test_walkthrough.py with one
4 GiB text file (a little more, so offsets pass 2^32) as the DApp's input, run with
``--shield fuse``, so the program reads the input volume through the shield, chunk by
chunk, instead of from a decrypted copy. The counts that come back decrypted must be exact.

Where the bytes go (what the space check asks for, from how the walkthrough works today):
the disk under pytest's temporary folder holds INPUTS (deleted after the push), the push's
sealed volume and bundle (in the system temporary folder, while pushing), the transfer
service's input and output bundles, the downloaded output bundle and ``tdapp decrypt``'s
unpacked copy of it; ``tdapp run`` holds the downloaded bundle, its unpacked volumes and the
output bundle (which carries the input volume again) under /dev/shm, i.e. in memory.
``TDAPP_LARGE_INPUT_MIB`` sets a smaller input for a trial run of this test.

``tdapp up``'s transfer service refuses uploads over 1 GiB and ``tdapp up`` has no option to
change that, so the bundles go through a second one (``tdapp transfer serve --max-size``);
the CAS and the LAS are ``tdapp up``'s.
"""

from __future__ import annotations

import collections
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from ctypes.util import find_library
from pathlib import Path

import pytest
from cas_fixtures import free_port
from walk_fixtures import PYTHON_HOST, Walk, running_up

REPO = Path(__file__).resolve().parent.parent
GiB = 1024**3
MiB = 1024**2
INPUT_BYTES = int(os.environ.get("TDAPP_LARGE_INPUT_MIB", "4096")) * MiB
COMMAND_TIMEOUT_S = 1800
SHM = Path("/dev/shm")

# Tabs and runs of spaces, case to fold, a two-byte letter. The page is 119 bytes (odd), so
# words fall across the 64 KiB chunks and the program's 1 MiB reads at ever different places.
PAGE = ("Trusted DApps keep their secrets\n"
        "trusted\tcode,  TRUSTED data: été\n"
        "KEEP calm and count every word été Été\n"
        "secrets\n")

pytestmark = [
    pytest.mark.large,
    pytest.mark.timeout(2 * COMMAND_TIMEOUT_S),
    pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is missing"),
    pytest.mark.skipif(not os.access("/dev/fuse", os.R_OK | os.W_OK)
                       or shutil.which("fusermount3") is None or find_library("fuse3") is None,
                       reason="FUSE is not usable here (/dev/fuse, fusermount3, libfuse3)"),
]


def _memory_available() -> int:
    with open("/proc/meminfo", encoding="ascii") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def _skip_without_room(work: Path, size: int) -> None:
    """Skip, saying what is short, unless the disk and memory can hold every copy."""
    sealed = size + size // 50 + 64 * MiB  # a volume or bundle: the input plus tags
    needs = {work: 4 * sealed + size}  # INPUTS, transfer (in, out), ZIP, decrypt's unpack
    temporary = Path(tempfile.gettempdir())
    if os.stat(temporary).st_dev == os.stat(work).st_dev:
        needs[work] += 2 * sealed  # the push's volume and bundle, INPUTS still there
    else:
        needs[temporary] = 2 * sealed
    needs[SHM] = 3 * sealed  # tdapp run: bundle, unpacked volumes, output bundle
    short = [f"{shutil.disk_usage(path).free / GiB:.1f} GiB free at {path}, "
             f"need {need / GiB:.1f} GiB" for path, need in needs.items()
             if shutil.disk_usage(path).free < need]
    if _memory_available() < needs[SHM]:
        short.append(f"{_memory_available() / GiB:.1f} GiB of memory available for "
                     f"{SHM}, need {needs[SHM] / GiB:.1f} GiB")
    if short:
        pytest.skip("not enough room for a 4 GiB input through the walkthrough: "
                    + "; ".join(short))


def _write_corpus(path: Path, size: int) -> collections.Counter[str]:
    """At least ``size`` bytes of PAGE repeated; returns the counts wordcount must find."""
    block = PAGE.encode() * ((1 << 20) // len(PAGE.encode()) + 1)
    blocks = size // len(block) + 1
    with path.open("xb", buffering=0) as corpus:
        for _ in range(blocks):
            corpus.write(block)
    assert path.stat().st_size > size
    pages = blocks * (len(block) // len(PAGE.encode()))
    return collections.Counter({word: count * pages for word, count in
                                collections.Counter(PAGE.casefold().split()).items()})


@contextmanager
def _transfer_service(root: Path, env: dict[str, str]) -> Iterator[str]:
    """``tdapp transfer serve`` with room for the bundles; yields its upload URL."""
    port = free_port()
    with (root / "transfer.log").open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "tdapp", "transfer", "serve", "--port", str(port),
             "--store", str(root / "transfer"), "--max-size", str(4 * INPUT_BYTES + GiB)],
            env=env, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not _listening(port):
            assert process.poll() is None, (root / "transfer.log").read_text()
            assert time.monotonic() < deadline, "tdapp transfer serve did not start"
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}/upload"
    finally:
        process.terminate()
        process.wait(timeout=30)


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def _tdapp(walk: Walk, *args: str) -> subprocess.CompletedProcess[str]:
    """``Walk.tdapp`` with room for gigabytes (it allows 300 s a command)."""
    done = subprocess.run([sys.executable, "-m", "tdapp", *args], cwd=walk.example,
                          env=walk.env, capture_output=True, text=True, check=False,
                          timeout=COMMAND_TIMEOUT_S, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, f"tdapp {' '.join(args[:2])}:\n{done.stderr[-3000:]}"
    return done


def test_wordcount_counts_a_4_gib_input_through_the_fuse_shield(tmp_path: Path) -> None:
    _skip_without_room(tmp_path, INPUT_BYTES)
    with running_up(tmp_path) as walk, _transfer_service(tmp_path, walk.env) as push:
        walk.tdapp("build", str(REPO / "examples" / "wordcount"), "--name", "wordcount",
                   "-o", str(walk.example / "KEYS" / "wordcount.yml"),
                   "--entrypoint", "/usr/bin/python3 -I /wordcount.py", "--heap", "512M",
                   *PYTHON_HOST)
        corpus = walk.example / "INPUTS" / "corpus.txt"
        expected = _write_corpus(corpus, INPUT_BYTES)
        command = _tdapp(walk, "encryptedpush", "--application", "wordcount",
                         "-t", "KEYS/wordcount.yml", "--push", push).stdout.split()
        corpus.unlink()  # sealed and uploaded; make room

        ran = _tdapp(walk, "run", "wordcount", *command, "--push", push, "--shield", "fuse")
        assert "volume encrypted-input-files: mounted by the FUSE shield" in ran.stderr
        assert f"{sum(expected.values())} words in 1 files" in ran.stderr
        url = ran.stdout.strip()
        assert url.startswith("http://127.0.0.1:") and "\n" not in url

        bundle = walk.example / "ZIP" / "out.zip"
        subprocess.run(["curl", "--silent", "--show-error", "--fail", "--output", str(bundle),
                        url], check=True, timeout=COMMAND_TIMEOUT_S)
        _tdapp(walk, "decrypt")
        bundle.unlink()
        outputs = walk.example / "OUTPUTS"
        counts = {word: int(count) for word, count in (
            line.split("\t") for line in
            (outputs / "counts.tsv").read_text(encoding="utf-8").splitlines())}
        assert counts == dict(expected)
        assert (outputs / "summary.txt").read_text(encoding="utf-8") == (
            f"files 1\nwords {sum(expected.values())}\ndistinct {len(expected)}\n")

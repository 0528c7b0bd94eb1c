"""Shield throughput: one file written and read through tdapp's FUSE shield, gocryptfs and plain.

What it measures
    On ONE file system (tmpfs under ``/dev/shm`` by default, so no disk is measured;
    ``--dir`` to choose another), three targets:

    plain      a folder on that file system, no mount: the I/O ceiling.
    gocryptfs  a gocryptfs cipher folder there, mounted with its defaults (benchkit's
               Gocryptfs peer: ``-init -scryptn 10 -passfile``; set-up is not timed).
    tdapp      an empty tdapp volume there (``Volume.create``, not timed), mounted with
               ``tdapp volume mount VOLUME MOUNTPOINT`` (key and tag in VOLUME_KEY and
               VOLUME_TAG); each unmount prints the new tag, used for the next mount.

    and three operations on one file of 1 GiB (``--quick``: 256 MiB):

    seq write  mount; open a new file, write it in 1 MiB blocks from one preallocated
               buffer (each block stamped with its index), fsync, close, UNMOUNT. The time
               runs from the open to the end of the unmount: for tdapp the unmount is when
               the volume is sealed and its new tag printed, so only then is the write
               done. The unmount alone is in the JSON (``unmount_after_write_s``), with the
               MB/s without it (``seq_write_without_unmount_MBps``).
    seq read   mount again (``--read-only`` for tdapp), so the FUSE mount's page cache
               starts empty (tmpfs cannot drop caches); read the file in 1 MiB blocks into
               a preallocated buffer, checking each block's stamp. Unmount not timed.
    random 4K  mount again; ``--random-reads`` (20,000) preads of 4 KiB at random 4 KiB
               aligned offsets into a preallocated buffer (fixed seed, the same offsets for
               every target; POSIX_FADV_RANDOM, so no readahead). MB/s and ops/s.

How it measures
    ``--repeat`` rounds (3; ``--quick`` 1), the targets taking turns, each round on a fresh
    store that is deleted afterwards; the best time counts. Every step runs under a
    deadline; before each step the file system is synced (on a disk the store is also
    dropped from the page cache). The first round also checks every byte read back.
    Mounts are always unmounted (fusermount3 -u, then -uz), even on failure or SIGTERM.
    MB = 10^6 bytes.

How to read it
    A table per target and operation (best s, MB/s, ops/s, "x plain", "tdapp x"), then
    one row per operation with every target's MB/s and tdapp / gocryptfs, tdapp / plain;
    then the targets, each "met" or "NOT MET" (tdapp seq write, seq read and random 4K
    reads each >= 2.0 x gocryptfs, MB/s over MB/s of the same run; "not measured" if a
    target was skipped or failed) and, as the LAST stdout line, one JSON object with every
    figure ("targets_met" per target, "all_targets_met"). Progress goes to stderr.

    .venv/bin/python benchmarks/shield_throughput.py [--quick] [--repeat N] [--dir DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, Protocol

from rich.console import Console

from tdapp.volume import DEFAULT_CHUNK_SIZE, Volume, VolumeKey, VolumeTag
from tdapp.volume.layout import sync_file_system

# benchkit/ sits next to this file and is not installed (see volume_throughput.py).
BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

from benchkit.filesystems import (  # noqa: E402
    TMPFS_BASE,
    FileSystem,
    describe_file_system,
    settle,
    space_problem,
)
from benchkit.peers import Gocryptfs  # noqa: E402
from benchkit.processes import ForegroundMount, deadline, log  # noqa: E402
from benchkit.report import (  # noqa: E402
    Check,
    Layout,
    Result,
    Results,
    comparison_table,
    compute_ratios,
    find,
    print_report,
    ratio,
    record,
    rounded,
    summary,
)
from benchkit.trees import remove_tree  # noqa: E402
from benchkit.units import MB, KiB, MiB, human_size  # noqa: E402

BLOCK_SIZE = 1 * MiB
RANDOM_SIZE = 4 * KiB
FILE_NAME = "data.bin"
SEED = 20_240_601

SEQ, RANDOM = "seq", "rand4k"
# key in the JSON -> (workload, side, least tdapp MB/s / gocryptfs MB/s, taken in the same run)
TARGET_RATIOS = {
    "seq_write_vs_gocryptfs_min": (SEQ, "write", 2.0),
    "seq_read_vs_gocryptfs_min": (SEQ, "read", 2.0),
    "rand4k_read_vs_gocryptfs_min": (RANDOM, "read", 2.0),
}
TARGETS = {key: minimum for key, (_, _, minimum) in TARGET_RATIOS.items()}
LAYOUT = Layout(subject="tdapp", reference="plain", tools=("plain", "gocryptfs", "tdapp"),
                workloads=(SEQ, RANDOM), file_systems=("tmpfs", "disk"), count_name="ops")

DEFINITIONS = (
    "seq write = open a new file, write 1 MiB blocks from a preallocated buffer, fsync, close,",
    "  then unmount: the time INCLUDES the unmount (for tdapp: sealing and the new tag).",
    "seq read  = after a fresh mount (empty FUSE page cache; tdapp --read-only), read the file",
    "  in 1 MiB blocks into a preallocated buffer. The unmount is not timed.",
    "random 4K = after a fresh mount, 4 KiB preads at random aligned offsets (fixed seed, same",
    "  offsets for every target, POSIX_FADV_RANDOM). Unmount not timed.",
    "plain = the same file system directly, no mount and nothing to remount.",
    "tdapp x = tdapp's MB/s / the row's MB/s (on the gocryptfs row: tdapp / gocryptfs).",
)


# -- configuration ---------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    file_size: int
    random_reads: int
    repeats: int
    chunk_size: int
    step_timeout_s: float
    quick: bool

    @property
    def need_free_bytes(self) -> int:
        # one target's store at a time, plus the FUSE mount's page cache (tmpfs: memory)
        return 3 * self.file_size


def settings_from(args: argparse.Namespace) -> Settings:
    size = args.size_mib * MiB if args.size_mib else (256 if args.quick else 1024) * MiB
    return Settings(file_size=size, random_reads=args.random_reads,
                    repeats=args.repeat or (1 if args.quick else 3), chunk_size=args.chunk_size,
                    step_timeout_s=120.0 if args.quick else 300.0, quick=args.quick)


def choose_file_system(directory: Path | None, need: int) -> FileSystem:
    base = directory or TMPFS_BASE
    if not os.access(base, os.W_OK):
        raise SystemExit(f"shield_throughput: {base} is not a writable folder")
    probe = describe_file_system("tmpfs", base)
    fs = probe if probe.in_memory else describe_file_system("disk", base)
    problem = space_problem(fs, need)
    if problem:
        raise SystemExit(f"shield_throughput: {problem}")
    return fs


# -- the targets ----------------------------------------------------------------------


class Target(Protocol):
    name: str

    def missing(self) -> str | None:
        """Why the target cannot run here, or None."""

    def note(self) -> str:
        """The table's note on this target's rows."""

    def prepare(self, store: Path) -> None:
        """Make a new, empty store in the new folder ``store`` (not timed)."""

    def mounted(self, read_only: bool) -> AbstractContextManager[Path]:
        """The store's folder of files, mounted for the ``with`` block if it is a mount."""


class Plain:
    name = "plain"

    def __init__(self) -> None:
        self._folder = Path()

    def missing(self) -> str | None:
        return None

    def note(self) -> str:
        return "the file system itself, no mount"

    def prepare(self, store: Path) -> None:
        store.mkdir()
        self._folder = store

    def mounted(self, read_only: bool) -> AbstractContextManager[Path]:
        return contextlib.nullcontext(self._folder)


class GocryptfsMount:
    name = "gocryptfs"

    def __init__(self, secrets: Path) -> None:
        self._peer = Gocryptfs(secrets)
        self._cipher = self._mount_point = Path()

    def missing(self) -> str | None:
        return self._peer.missing()

    def note(self) -> str:
        return "gocryptfs FUSE mount, default options"

    def prepare(self, store: Path) -> None:
        self._cipher, self._mount_point = store / "cipher", store / "mnt"
        self._peer.init(self._cipher)
        self._mount_point.mkdir()

    @contextlib.contextmanager
    def mounted(self, read_only: bool) -> Iterator[Path]:
        with self._peer.mounted(self._cipher, self._mount_point):
            yield self._mount_point


class TdappShield:
    """A tdapp volume mounted by ``tdapp volume mount`` (the shield) in the foreground."""

    name = "tdapp"

    def __init__(self, chunk_size: int, stop_timeout: float) -> None:
        self._chunk_size, self._stop_timeout = chunk_size, stop_timeout
        self._key = VolumeKey.generate()
        self._tag: VolumeTag | None = None
        self._volume = self._mount_point = Path()
        self.contract_notes: list[str] = []

    def missing(self) -> str | None:
        if not os.path.exists("/dev/fuse"):
            return "no /dev/fuse"
        probe = subprocess.run([sys.executable, "-m", "tdapp", "volume", "mount", "--help"],
                               capture_output=True, timeout=60, check=False)
        return None if probe.returncode == 0 else "tdapp volume mount is not available"

    def note(self) -> str:
        return f"tdapp volume mount, {human_size(self._chunk_size)} chunks"

    def prepare(self, store: Path) -> None:
        store.mkdir()
        self._volume, self._mount_point = store / "volume", store / "mnt"
        self._tag = Volume.create(self._volume, self._key, chunk_size=self._chunk_size).tag
        self._mount_point.mkdir()

    @contextlib.contextmanager
    def mounted(self, read_only: bool) -> Iterator[Path]:
        if self._tag is None:
            raise RuntimeError("no volume was prepared")
        command = [sys.executable, "-m", "tdapp", "volume", "mount", str(self._volume),
                   str(self._mount_point), *(["--read-only"] if read_only else [])]
        env = {**os.environ, "VOLUME_KEY": self._key.hex(), "VOLUME_TAG": self._tag.hex()}
        mount = ForegroundMount(command, self._mount_point, env=env,
                                stop_timeout=self._stop_timeout)
        with mount as point:
            yield point
        self._tag = self._new_tag(mount.stdout, read_only)

    def _new_tag(self, stdout: str, read_only: bool) -> VolumeTag:
        lines = stdout.splitlines()
        if len(lines) != 1:
            raise RuntimeError(f"tdapp volume mount printed {len(lines)} lines, not one tag: "
                               f"{stdout[:200]!r}")
        tag = VolumeTag.from_hex(lines[0].strip())
        if read_only and tag != self._tag:
            note = "a --read-only mount printed a tag other than the one it was given"
            if note not in self.contract_notes:
                self.contract_notes.append(note)
                log(f"  warning: {note}")
        return tag


# -- the operations -------------------------------------------------------------------------


def _stamp(index: int) -> bytes:
    return index.to_bytes(8, "little")


def _read_into(fd: int, view: memoryview) -> None:
    got = 0
    while got < len(view):
        count = os.readv(fd, [view[got:]])
        if count == 0:
            raise RuntimeError("the file ended early")
        got += count


def write_file(path: Path, size: int, block: bytearray) -> None:
    """``size`` bytes in blocks of ``len(block)``, each stamped with its index; fsync."""
    view = memoryview(block)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        for index in range(size // len(block)):
            view[:8] = _stamp(index)
            rest = view
            while rest:
                rest = rest[os.write(fd, rest):]
        os.fsync(fd)
    finally:
        os.close(fd)


def read_file(path: Path, size: int, block: bytearray) -> None:
    """Read the file in blocks of ``len(block)``, checking each block's stamp and the end."""
    view = memoryview(block)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        for index in range(size // len(block)):
            _read_into(fd, view)
            if view[:8] != _stamp(index):
                raise RuntimeError(f"block {index} of {path.name} came back wrong")
        if os.read(fd, 1):
            raise RuntimeError(f"{path.name} is longer than {size} bytes")
    finally:
        os.close(fd)


def check_file(path: Path, size: int, pattern: bytes) -> None:
    """Every byte of the file against what ``write_file`` wrote (not timed)."""
    expected, got = bytearray(pattern), bytearray(len(pattern))
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        for index in range(size // len(pattern)):
            expected[:8] = _stamp(index)
            _read_into(fd, memoryview(got))
            if got != expected:
                raise RuntimeError(f"block {index} of {path.name} differs from what was written")
    finally:
        os.close(fd)


def random_reads(path: Path, offsets: list[int]) -> None:
    buffer = bytearray(RANDOM_SIZE)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        short = sum(os.preadv(fd, [buffer], offset) != RANDOM_SIZE for offset in offsets)
    finally:
        os.close(fd)
    if short:
        raise RuntimeError(f"{short} of {len(offsets)} random reads came back short")


# -- the measuring loop ----------------------------------------------------------------


@dataclass
class Runs:
    """One target's results, and the unmount times that its writes include."""

    write: Result
    read: Result
    random: Result
    unmounts: list[float] = field(default_factory=list)

    @property
    def all(self) -> tuple[Result, Result, Result]:
        return self.write, self.read, self.random


@dataclass(frozen=True)
class Bench:
    fs: FileSystem
    work: Path
    settings: Settings
    pattern: bytes
    offsets: list[int]


def _in_mount(bench: Bench, target: Target, what: str, read_only: bool,
              step: Callable[[Path], None],
              after: Callable[[Path], None] | None = None) -> tuple[float, float]:
    """Settle, mount, time ``step(file)``, run ``after(file)`` untimed, unmount.

    Returns the seconds of the step, and of the step through the end of the unmount (which
    only means something without ``after``).
    """
    settle(bench.fs, bench.work, bench.work)
    with deadline(bench.settings.step_timeout_s, f"{target.name} {what}"):
        with target.mounted(read_only) as folder:
            path = folder / FILE_NAME
            start = time.perf_counter()
            step(path)
            stepped = time.perf_counter() - start
            if after is not None:
                after(path)
        return stepped, time.perf_counter() - start


def measure_once(bench: Bench, target: Target, runs: Runs, check: bool) -> None:
    """One seq write, seq read and random-read round of ``target`` on a fresh store."""
    size, store = bench.settings.file_size, bench.work / f"store-{target.name}"
    block = bytearray(bench.pattern)
    try:
        target.prepare(store)
        written, with_unmount = _in_mount(bench, target, "seq write", False,
                                          lambda path: write_file(path, size, block))
        runs.write.runs.append(with_unmount)
        runs.unmounts.append(with_unmount - written)
        verify = (lambda path: check_file(path, size, bench.pattern)) if check else None
        read, _ = _in_mount(bench, target, "seq read", True,
                            lambda path: read_file(path, size, block), verify)
        runs.read.runs.append(read)
        randomly, _ = _in_mount(bench, target, "random reads", True,
                                lambda path: random_reads(path, bench.offsets))
        runs.random.runs.append(randomly)
    finally:
        remove_tree(store)
        sync_file_system(bench.work)
    log(f"  {target.name:9s} seq write {runs.write.runs[-1]:7.3f} s "
        f"(unmount {runs.unmounts[-1]:.3f} s), seq read {runs.read.runs[-1]:7.3f} s, "
        f"random {runs.random.runs[-1]:7.3f} s")


def new_runs(results: Results, fs: FileSystem, settings: Settings, target: Target) -> Runs:
    size, reads = settings.file_size, settings.random_reads
    seq_label = f"1 x {human_size(size)} in {human_size(BLOCK_SIZE)} blocks"
    random_label = f"{reads:,} x {human_size(RANDOM_SIZE)} at random"
    note = target.note()

    def new(workload: str, direction: str, size: int, count: int, label: str) -> Result:
        return record(results, Result(fs.key, workload, target.name, direction, size, count,
                                      label, note))

    return Runs(new(SEQ, "write", size, 1, seq_label), new(SEQ, "read", size, 1, seq_label),
                new(RANDOM, "read", reads * RANDOM_SIZE, reads, random_label))


def measure(bench: Bench, targets: list[Target], results: Results) -> dict[str, Runs]:
    """``repeats`` rounds of every available target in turn; a failing one drops out."""
    every: dict[str, Runs] = {}
    active: list[Target] = []
    for target in targets:
        runs = every[target.name] = new_runs(results, bench.fs, bench.settings, target)
        reason = target.missing()
        if reason:
            log(f"{target.name}: skipped — {reason}")
            for result in runs.all:
                result.status = reason
        else:
            active.append(target)
    for repeat in range(bench.settings.repeats):
        log(f"round {repeat + 1} of {bench.settings.repeats}")
        for target in list(active):
            runs = every[target.name]
            try:
                measure_once(bench, target, runs, check=repeat == 0)
            except Exception as error:  # one broken target must not stop the others
                log(f"  {target.name} FAILED: {error}")
                for result in runs.all:
                    result.status = f"failed: {error}"[:120]
                active.remove(target)
    return every


# -- targets and the report ----------------------------------------------------------------


def target_checks(results: Results, fs: str) -> list[Check]:
    """tdapp's sequential write, sequential read and random 4 KiB reads >= 2 x gocryptfs's."""
    checks = []
    for key, (workload, kind, minimum) in TARGET_RATIOS.items():
        value = ratio(find(results, fs, workload, "tdapp", kind),
                      find(results, fs, workload, "gocryptfs", kind))
        checks.append(Check(key, f"{fs}/{workload}: tdapp {kind} / gocryptfs {kind}", value,
                            minimum, "x"))
    return checks


def unmount_figures(every: dict[str, Runs], size: int) -> dict[str, Any]:
    """The unmount seconds the seq writes include, and their MB/s without them."""
    unmounts, without = {}, {}
    for name, runs in every.items():
        if name == "plain" or runs.write.best is None:
            continue
        unmounts[name] = [round(seconds, 4) for seconds in runs.unmounts]
        best = min(total - unmount for total, unmount in zip(runs.write.runs, runs.unmounts,
                                                                strict=True))
        without[name] = rounded(size / best / MB)
    return {"unmount_after_write_s": unmounts, "seq_write_without_unmount_MBps": without}


# -- main -------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: a 256 MiB file, one repetition")
    parser.add_argument("--repeat", type=int, default=0,
                        help="rounds, the best counts (default 3; --quick 1)")
    parser.add_argument("--dir", type=Path, default=None,
                        help=f"where to work: a folder on the file system to measure "
                             f"(default {TMPFS_BASE}, tmpfs)")
    parser.add_argument("--size-mib", type=int, default=0,
                        help="file size in MiB (default 1024; --quick 256)")
    parser.add_argument("--random-reads", type=int, default=20_000,
                        help="how many random 4 KiB reads")
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE,
                        help="tdapp volume chunk size in bytes")
    return parser.parse_args(argv)


def _exit_on_sigterm(signum: int, _frame: object) -> NoReturn:
    raise SystemExit(128 + signum)  # so every finally unmounts and deletes


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    args = parse_args(argv)
    settings = settings_from(args)
    fs = choose_file_system(args.dir, settings.need_free_bytes)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    chooser = random.Random(SEED)  # the same offsets every run and for every target
    offsets = [chooser.randrange(settings.file_size // RANDOM_SIZE) * RANDOM_SIZE
               for _ in range(settings.random_reads)]
    results: Results = {}
    shield = TdappShield(settings.chunk_size, settings.step_timeout_s)
    work = Path(tempfile.mkdtemp(prefix=".shield-throughput-", dir=fs.base))
    log(f"working in {work} ({fs.fstype} on {fs.device}, mounted at {fs.mount_point}); "
        f"{human_size(settings.file_size)} file, best of {settings.repeats}")
    try:
        with tempfile.TemporaryDirectory(prefix="tdapp-bench-secrets-") as secrets:
            targets: list[Target] = [Plain(), GocryptfsMount(Path(secrets)), shield]
            bench = Bench(fs, work, settings, os.urandom(BLOCK_SIZE), offsets)
            every = measure(bench, targets, results)
    finally:
        remove_tree(work)
    elapsed = time.perf_counter() - started
    log(f"done in {elapsed:.0f} s")
    checks = target_checks(results, fs.key)
    console = Console(file=sys.stdout, width=160, highlight=False, soft_wrap=False)
    comparison = comparison_table(f"MB/s per operation on {fs.label}", results, LAYOUT, fs.key)
    print_report(console, f"Shield throughput (best of {settings.repeats}; MB = 10^6 bytes)",
                 DEFINITIONS, results, LAYOUT, {fs.key: fs}, {}, checks, [comparison])
    sys.stdout.flush()
    head: dict[str, Any] = {
        "benchmark": "shield_throughput",
        "quick": settings.quick,
        "repeats": settings.repeats,
        "file_size": settings.file_size,
        "block_size": BLOCK_SIZE,
        "random_reads": settings.random_reads,
        "random_read_size": RANDOM_SIZE,
        "seed": SEED,
        "tdapp_chunk_size": settings.chunk_size,
        "seq_write_timing": "open, write, fsync, close and unmount (tdapp: seal, new tag)",
        "file_system": fs.as_json(),
        **unmount_figures(every, settings.file_size),
        "contract_notes": shield.contract_notes,
        "targets": TARGETS,
    }
    print(json.dumps(summary(head, results, LAYOUT, {fs.key: fs}, {},
                             compute_ratios(results, LAYOUT, [fs.key]), checks, elapsed)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Volume throughput: tdapp encrypt/decrypt against plain I/O, gocryptfs, age and raw AES-GCM.

What it measures
    On two file systems -- tmpfs (``/dev/shm``: memory, so the disk is not what is
    measured) and the working disk (a temporary folder next to this script, or
    ``--disk-dir``; refused if memory-backed) -- and two workloads -- one 1 GiB file
    ("large") and 10,000 files of 1 KiB in 100 folders x 100 files ("small"):

    plain write    copy the source tree to a new tree on the same file system with a
                   Python streaming copy (raw unbuffered files, ``readinto`` a 64 KiB
                   buffer + ``write``), then syncfs: the I/O an encrypt does, minus crypto.
    plain read     the same copy from that stored tree to a new output tree: the I/O a
                   decrypt does, minus crypto.
    tdapp encrypt  ``Volume.create(root, key, source=tree)`` (it syncfs-es by itself).
    tdapp decrypt  ``Volume.open(root, key, tag)`` + ``extract(out)``.
    gocryptfs      the same streaming copy into a fresh gocryptfs mount + syncfs (write);
                   unmount, remount (cold-ish cache), copy back out to a plain tree (read).
    age            X25519 recipient. Large file: ``age -r R -o out in`` / ``age -d -i F``.
                   Small files: one ``tar | age`` stream each way (10,000 age runs would
                   measure process start-up); the table says so.
    AES-256-GCM    ``cryptography``'s AESGCM over 64 KiB chunks of 1 GiB in memory, no
                   I/O: the compute ceiling.

How it measures
    Every step runs ``--repeats`` times (3; 1 with ``--quick``), tools taking turns,
    and the best time counts. Write/encrypt steps end with a syncfs of the target file
    system inside the timing; read/decrypt steps do not sync (tdapp extract does not).
    Set-up (gocryptfs init and mount, key generation) is not timed. Between steps
    everything is synced and outputs are deleted, untimed (trees of many small files
    only after the workload, see ``Stage.dispose``); on the disk each step's
    input files are first dropped from the page cache (posix_fadvise DONTNEED), so
    file data comes from the disk (dentries and inodes stay cached). MB = 10^6 bytes
    of plaintext; every output is checked against the source after the first run.

How to read it
    One row per file system x workload x tool x direction: best seconds, MB/s,
    files/s (small files), "x plain" = MB/s / plain write (encrypt, write) or plain
    read (decrypt, read) on the same file system and workload -- 1.00 is the I/O
    ceiling -- and "tdapp x" = how many times tdapp's MB/s that row is. Then the
    targets, each "met" or "NOT MET" with its ratio from this same run (tdapp >= 0.90 x
    plain I/O on the large file and >= 0.70 x on the small files, both directions;
    >= 5 x gocryptfs on the large file; >= 5,000 files/s on tmpfs) and, as the last
    stdout line, one JSON object with every figure and target. Progress goes to stderr.

    .venv/bin/python benchmarks/volume_throughput.py [--quick] [--only tmpfs|disk]
    (a full run takes about 3 minutes on 2 cores; --quick a few seconds)

Layout
    This file holds what is tdapp's own: the tdapp tool, the workloads, the targets and
    main. File systems, processes, trees, the peer tools, the measuring loop and the
    report come from the ``benchkit`` package next to it (see its ``__init__``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from rich.console import Console

from tdapp.volume import DEFAULT_CHUNK_SIZE, Volume, VolumeKey, VolumeTag

# benchkit/ sits next to this file and is not installed. Running this file as a script
# already puts its folder on sys.path; loading it any other way (runpy, a test, an import
# from the repository root) does not. So add the folder before importing benchkit.
BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

from benchkit.filesystems import choose_file_systems  # noqa: E402
from benchkit.harness import measure_file_system  # noqa: E402
from benchkit.peers import Age, Gocryptfs, PlainCopy, Tool  # noqa: E402
from benchkit.processes import deadline, log  # noqa: E402
from benchkit.report import (  # noqa: E402
    Check,
    Layout,
    Result,
    Results,
    compute_ratios,
    figures,
    find,
    print_report,
    rate_checks,
    ratio,
    ratio_checks,
    record,
    rounded,
    summary,
)
from benchkit.trees import Workload  # noqa: E402
from benchkit.units import GiB, KiB, MiB, human_size  # noqa: E402

AES_CHUNK_SIZE = 64 * KiB
AES_AAD = bytes(40)  # about the size of tdapp's per-chunk associated data
AES_TOOL = "AES-256-GCM"

TARGET_LARGE_VS_PLAIN = 0.90  # one large file: overlapped I/O should reach the disk's pace
TARGET_VS_PLAIN = 0.70  # many small files: per-file costs (a key, an object) dominate
TARGET_VS_GOCRYPTFS = 5.0
TARGET_SMALL_FILES_PER_S = 5_000.0

WORKLOADS = ("large", "small")
LAYOUT = Layout(subject="tdapp", reference="plain",
                tools=("plain", "tdapp", "gocryptfs", "age", AES_TOOL), workloads=WORKLOADS,
                file_systems=("tmpfs", "disk", "memory"), json_names={AES_TOOL: "aesgcm"})

PLAIN_DEFINITIONS = (
    "plain write = Python streaming copy (raw unbuffered files, readinto a 64 KiB buffer + write)",
    "  of the source tree to a new tree on the same file system, then syncfs: the I/O an encrypt",
    "  does minus the crypto.",
    "plain read  = the same copy from the stored tree to a new output tree (no sync): the I/O a",
    "  decrypt does minus the crypto.",
    "Write/encrypt times include a syncfs of the target file system; read/decrypt times do not.",
    "On the disk, every step's input files are dropped from the page cache first (fadvise).",
    "age on the small files: ONE tar | age stream each way, not one age run per file.",
)


# -- configuration ---------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    workloads: dict[str, Workload]
    repeats: int
    chunk_size: int
    step_timeout_s: float
    aes_total_bytes: int
    quick: bool

    @property
    def need_free_bytes(self) -> int:
        return 4 * self.workloads["large"].total_bytes


def settings_from(args: argparse.Namespace) -> Settings:
    if args.quick:
        large = Workload("large", 1, 128 * MiB, 0)
        small = Workload("small", 1_000, 1 * KiB, 10)
    else:
        large = Workload("large", 1, 1 * GiB, 0)
        small = Workload("small", 10_000, 1 * KiB, 100)
    return Settings(
        workloads={"large": large, "small": small},
        repeats=args.repeats or (1 if args.quick else 3),
        chunk_size=args.chunk_size,
        step_timeout_s=120.0 if args.quick else 300.0,
        aes_total_bytes=large.total_bytes,
        quick=args.quick,
    )


# -- the tool under test --------------------------------------------------------------


class TdappVolume:
    name = "tdapp"
    verbs = ("encrypt", "decrypt")

    def __init__(self, chunk_size: int) -> None:
        self._chunk_size = chunk_size
        self._key = VolumeKey.generate()
        self._tag: VolumeTag | None = None

    def missing(self) -> str | None:
        return None

    def note(self, workload: Workload) -> str:
        return f"Volume.create / open+extract, {human_size(self._chunk_size)} chunks"

    def facts(self, workload: Workload) -> dict[str, str]:
        return {}

    def write(self, source: Path, stored: Path, workload: Workload) -> float:
        start = time.perf_counter()
        volume = Volume.create(stored, self._key, source=source, chunk_size=self._chunk_size)
        elapsed = time.perf_counter() - start
        self._tag = volume.tag
        return elapsed

    def read(self, stored: Path, output: Path, workload: Workload) -> float:
        if self._tag is None:
            raise RuntimeError("no volume was written")
        start = time.perf_counter()
        Volume.open(stored, self._key, self._tag).extract(output)
        return time.perf_counter() - start


# -- the compute ceiling ------------------------------------------------------------------


def measure_aes(settings: Settings, results: Results) -> None:
    """AES-256-GCM over 64 KiB chunks in memory: what the CPU can do at best."""
    chunks = settings.aes_total_bytes // AES_CHUNK_SIZE
    aead = AESGCM(AESGCM.generate_key(bit_length=256))
    plaintext = os.urandom(AES_CHUNK_SIZE)
    nonces = [index.to_bytes(12, "big") for index in range(chunks)]
    sealed = [aead.encrypt(nonce, plaintext, AES_AAD) for nonce in nonces[:16]]
    encrypt, decrypt = (record(results, Result(
        "memory", "large", AES_TOOL, direction, settings.aes_total_bytes, 1,
        f"{human_size(settings.aes_total_bytes)} in {human_size(AES_CHUNK_SIZE)}",
        "in memory, no I/O: compute ceiling")) for direction in ("encrypt", "decrypt"))
    with deadline(settings.step_timeout_s, "AES-GCM"):
        for _ in range(settings.repeats):
            start = time.perf_counter()
            for nonce in nonces:
                aead.encrypt(nonce, plaintext, AES_AAD)
            encrypt.runs.append(time.perf_counter() - start)
            start = time.perf_counter()
            for index in range(chunks):
                aead.decrypt(nonces[index % 16], sealed[index % 16], AES_AAD)
            decrypt.runs.append(time.perf_counter() - start)
    log(f"AES-256-GCM in memory: encrypt {encrypt.mbps:,.0f} MB/s, "
        f"decrypt {decrypt.mbps:,.0f} MB/s")


# -- targets and ratios ------------------------------------------------------------------


def target_checks(results: Results, measured: list[str]) -> list[Check]:
    """tdapp >= 0.90 x plain I/O on the large file and >= 0.70 x on the small files (both
    directions, each file system); >= 5 x gocryptfs on the large file; >= 5,000 files/s."""
    checks = []
    for fs in measured:
        checks += ratio_checks(results, LAYOUT, fs, ("large",), "plain", TARGET_LARGE_VS_PLAIN,
                               "ge_0.90")
        checks += ratio_checks(results, LAYOUT, fs, ("small",), "plain", TARGET_VS_PLAIN,
                               "ge_0.70")
        checks += ratio_checks(results, LAYOUT, fs, ("large",), "gocryptfs",
                               TARGET_VS_GOCRYPTFS, "ge_5x")
    if "tmpfs" in measured:
        checks += rate_checks(results, LAYOUT, "tmpfs", "small", TARGET_SMALL_FILES_PER_S,
                              "ge_5000")
    return checks


def volume_ratios(results: Results, measured: list[str]) -> dict[str, Any]:
    """benchkit's tdapp-vs-every-tool ratios, plus tdapp on tmpfs vs raw AES-GCM."""
    ratios = compute_ratios(results, LAYOUT, measured)
    if "tmpfs" in measured:
        ratios["memory"] = {
            f"tdapp_tmpfs_large_{direction}_vs_aesgcm": rounded(ratio(
                find(results, "tmpfs", "large", "tdapp", kind),
                find(results, "memory", "large", AES_TOOL, kind)), 3)
            for kind, direction in (("write", "encrypt"), ("read", "decrypt"))
        }
    return ratios


# -- main -------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 128 MiB and 1,000 files, one repetition")
    parser.add_argument("--only", choices=("tmpfs", "disk"), help="measure one file system")
    parser.add_argument("--repeats", type=int, default=0, help="runs per step (best counts)")
    parser.add_argument("--disk-dir", type=Path, default=None,
                        help=f"folder on the working disk (default {BENCH_DIR})")
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE,
                        help="tdapp chunk size in bytes")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    args = parse_args(argv)
    settings = settings_from(args)
    file_systems, skipped = choose_file_systems(args.only, args.disk_dir, BENCH_DIR,
                                                settings.need_free_bytes)
    results: Results = {}
    measure_aes(settings, results)
    workloads = [settings.workloads[name] for name in WORKLOADS]
    with tempfile.TemporaryDirectory(prefix="tdapp-bench-secrets-") as secrets:
        tools: list[Tool] = [PlainCopy(), TdappVolume(settings.chunk_size),
                             Gocryptfs(Path(secrets)), Age(Path(secrets), settings.step_timeout_s)]
        for fs in file_systems.values():
            measure_file_system(fs, workloads, tools, results, settings.repeats,
                                settings.step_timeout_s, ".volume-throughput-")
    elapsed = time.perf_counter() - started
    log(f"done in {elapsed:.0f} s")
    measured = list(file_systems)
    checks = target_checks(results, measured)
    console = Console(file=sys.stdout, width=160, highlight=False, soft_wrap=False)
    title = f"Volume throughput (best of {settings.repeats}; MB = 10^6 bytes of plaintext)"
    print_report(console, title, PLAIN_DEFINITIONS, results, LAYOUT, file_systems, skipped,
                 checks)
    sys.stdout.flush()
    head: dict[str, Any] = {
        "benchmark": "volume_throughput",
        "quick": settings.quick,
        "repeats": settings.repeats,
        "tdapp_chunk_size": settings.chunk_size,
        "file_systems": {key: fs.as_json() for key, fs in file_systems.items()},
        "memory": figures(results, LAYOUT, "memory", "large"),
    }
    print(json.dumps(summary(head, results, LAYOUT, file_systems, skipped,
                             volume_ratios(results, measured), checks, elapsed)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Trees of files: the Workload shape, making a source, streaming copies, checks, deletion."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from .filesystems import mounts_under
from .processes import log, unmount
from .units import KiB, MiB, human_size

COPY_BUFFER_SIZE = 64 * KiB
SAMPLE_SIZE = 1 * MiB


@dataclass(frozen=True)
class Workload:
    """A source tree: ``files`` files of ``file_size`` bytes, spread over ``folders``."""

    name: str
    files: int
    file_size: int
    folders: int  # 0: the files sit at the root

    @property
    def total_bytes(self) -> int:
        return self.files * self.file_size

    @property
    def label(self) -> str:
        if self.files == 1:
            return f"1 x {human_size(self.file_size)}"
        return f"{self.files:,} x {human_size(self.file_size)}"


def make_source(root: Path, workload: Workload) -> None:
    """Create ``root`` and fill it with the workload's files of random bytes."""
    root.mkdir()
    folders = [root] if workload.folders == 0 else [
        root / f"d{index:03d}" for index in range(workload.folders)
    ]
    per_folder = -(-workload.files // len(folders))
    for folder_index, folder in enumerate(folders):
        folder.mkdir(exist_ok=True)
        first = folder_index * per_folder
        for index in range(first, min(first + per_folder, workload.files)):
            write_random_file(folder / f"f{index:05d}.bin", workload.file_size)


def write_random_file(path: Path, size: int) -> None:
    with open(path, "xb", buffering=0) as writer:
        remaining = size
        while remaining:
            block = os.urandom(min(remaining, 8 * MiB))
            writer.write(block)
            remaining -= len(block)


def copy_file(source: Path, target: Path, buffer: memoryview) -> None:
    with open(source, "rb", buffering=0) as reader, open(target, "xb", buffering=0) as writer:
        while True:
            got = reader.readinto(buffer)
            if not got:
                return
            chunk = buffer[:got]
            while chunk:
                chunk = chunk[writer.write(chunk):]


def copy_tree(source: Path, target: Path) -> None:
    """The plain-I/O reference: a streaming copy of files and folders, nothing else."""
    buffer = memoryview(bytearray(COPY_BUFFER_SIZE))
    pending = [(source, target)]
    while pending:
        from_dir, to_dir = pending.pop()
        to_dir.mkdir(exist_ok=True)
        with os.scandir(from_dir) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    pending.append((Path(entry.path), to_dir / entry.name))
                else:
                    copy_file(Path(entry.path), to_dir / entry.name, buffer)


def tree_files(root: Path) -> dict[str, int]:
    """Relative path -> size of every file under ``root``."""
    files = {}
    for current, _, names in os.walk(root):
        for name in names:
            path = Path(current) / name
            files[path.relative_to(root).as_posix()] = path.stat().st_size
    return files


def _samples(path: Path, size: int) -> list[bytes]:
    offsets = [0] if size <= 4 * SAMPLE_SIZE else [0, size // 2, max(0, size - SAMPLE_SIZE)]
    length = size if size <= 4 * SAMPLE_SIZE else SAMPLE_SIZE
    with open(path, "rb") as reader:
        result = []
        for offset in offsets:
            reader.seek(offset)
            result.append(reader.read(length))
        return result


def check_same_tree(source: Path, output: Path) -> None:
    """Same files and sizes; same content (whole small files, samples of big ones)."""
    expected, actual = tree_files(source), tree_files(output)
    if expected != actual:
        missing = sorted(set(expected) ^ set(actual))[:3]
        raise RuntimeError(f"output tree differs from the source (e.g. {missing})")
    for relative, size in expected.items():
        if _samples(source / relative, size) != _samples(output / relative, size):
            raise RuntimeError(f"content of {relative} differs from the source")


def remove_tree(path: Path) -> None:
    """Delete ``path``, but never through a mount that is still there."""
    for point in mounts_under(path):
        unmount(Path(point))
    still = mounts_under(path)
    if still:
        log(f"warning: not deleting {path}: {still[0]} is still mounted")
        return
    shutil.rmtree(path, ignore_errors=True)

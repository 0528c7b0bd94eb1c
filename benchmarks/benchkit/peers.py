"""Tools that store a tree and bring it back: the Tool protocol, PlainCopy, Gocryptfs, Age.

The tool under test (e.g. tdapp's Volume) lives in its benchmark and follows the same
protocol; PlainCopy is the I/O ceiling, Gocryptfs and Age are the peers it is set against.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from tdapp.volume.layout import sync_file_system

from .processes import run_command, run_pipeline, unmount
from .trees import Workload, copy_tree, tree_files


class Tool(Protocol):
    name: str
    verbs: tuple[str, str]  # the directions of write and read, e.g. ("encrypt", "decrypt")

    def missing(self) -> str | None:
        """Why the tool cannot run here, or None."""

    def note(self, workload: Workload) -> str:
        """The table's note on this tool's rows for ``workload``."""

    def facts(self, workload: Workload) -> dict[str, str]:
        """Extra entries for ``workload``'s figures in the JSON summary."""

    def write(self, source: Path, stored: Path, workload: Workload) -> float:
        """Store the tree ``source`` into the new folder ``stored``; the timed seconds."""

    def read(self, stored: Path, output: Path, workload: Workload) -> float:
        """Bring the tree in ``stored`` back out to ``output``; the timed seconds."""


class PlainCopy:
    name = "plain"
    verbs = ("write", "read")

    def missing(self) -> str | None:
        return None

    def note(self, workload: Workload) -> str:
        return "I/O ceiling: streaming copy, no crypto"

    def facts(self, workload: Workload) -> dict[str, str]:
        return {}

    def write(self, source: Path, stored: Path, workload: Workload) -> float:
        stored.mkdir()
        start = time.perf_counter()
        copy_tree(source, stored / "tree")
        sync_file_system(stored)
        return time.perf_counter() - start

    def read(self, stored: Path, output: Path, workload: Workload) -> float:
        start = time.perf_counter()
        copy_tree(stored / "tree", output)
        return time.perf_counter() - start


class Gocryptfs:
    name = "gocryptfs"
    verbs = ("write", "read")

    def __init__(self, secrets: Path) -> None:
        self._passfile = secrets / "gocryptfs-password"

    def missing(self) -> str | None:
        if not shutil.which("gocryptfs"):
            return "not installed"
        if not (shutil.which("fusermount3") or shutil.which("fusermount")):
            return "not installed (fusermount)"
        if not os.path.exists("/dev/fuse"):
            return "no /dev/fuse"
        return None

    def note(self, workload: Workload) -> str:
        return "FUSE mount; remounted before read"

    def facts(self, workload: Workload) -> dict[str, str]:
        return {}

    def init(self, cipher: Path) -> None:
        """Make a new gocryptfs cipher folder ``cipher`` (fast scrypt: set-up is not timed)."""
        if not self._passfile.exists():
            self._passfile.write_text(os.urandom(16).hex() + "\n")
        cipher.mkdir(parents=True)
        run_command(["gocryptfs", "-init", "-quiet", "-scryptn", "10",
                     "-passfile", str(self._passfile), str(cipher)])

    def write(self, source: Path, stored: Path, workload: Workload) -> float:
        cipher, mount_point = stored / "cipher", stored / "mnt"
        self.init(cipher)
        mount_point.mkdir()
        with self.mounted(cipher, mount_point):
            start = time.perf_counter()
            copy_tree(source, mount_point / "tree")
            sync_file_system(cipher)  # the backing file system, where the data lands
            return time.perf_counter() - start

    def read(self, stored: Path, output: Path, workload: Workload) -> float:
        with self.mounted(stored / "cipher", stored / "mnt"):
            start = time.perf_counter()
            copy_tree(stored / "mnt" / "tree", output)
            return time.perf_counter() - start

    @contextlib.contextmanager
    def mounted(self, cipher: Path, mount_point: Path) -> Iterator[None]:
        """``cipher`` (made by ``init``) mounted at ``mount_point``; always unmounted after."""
        try:
            run_command(["gocryptfs", "-quiet", "-nosyslog", "-passfile", str(self._passfile),
                         str(cipher), str(mount_point)])
            if not os.path.ismount(mount_point):
                raise RuntimeError(f"gocryptfs did not mount {mount_point}")
            yield
        finally:
            unmount(mount_point)


class Age:
    name = "age"
    verbs = ("encrypt", "decrypt")

    def __init__(self, secrets: Path, timeout: float) -> None:
        self._identity = secrets / "age-identity.txt"
        self._recipient = ""
        self._timeout = timeout

    def missing(self) -> str | None:
        if not (shutil.which("age") and shutil.which("age-keygen")):
            return "not installed"
        if not shutil.which("tar"):
            return "not installed (tar)"
        return None

    def note(self, workload: Workload) -> str:
        if workload.files == 1:
            return "X25519, age -r / age -d per file"
        return "ONE tar | age stream, not per file"

    def facts(self, workload: Workload) -> dict[str, str]:
        return {} if workload.files == 1 else {"age_mode": "one tar | age stream"}

    def _recipient_key(self) -> str:
        if not self._recipient:
            run_command(["age-keygen", "-o", str(self._identity)])
            for line in self._identity.read_text().splitlines():
                if line.startswith("# public key: "):
                    self._recipient = line.removeprefix("# public key: ").strip()
        if not self._recipient:
            raise RuntimeError("age-keygen wrote no public key")
        return self._recipient

    def write(self, source: Path, stored: Path, workload: Workload) -> float:
        recipient = self._recipient_key()
        stored.mkdir()
        start = time.perf_counter()
        if workload.files == 1:
            for relative in tree_files(source):
                run_command(["age", "-r", recipient, "-o", str(stored / f"{relative}.age"),
                             str(source / relative)], self._timeout)
        else:
            run_pipeline(["tar", "-C", str(source), "-cf", "-", "."],
                         ["age", "-r", recipient, "-o", str(stored / "tree.tar.age")],
                         self._timeout)
        sync_file_system(stored)
        return time.perf_counter() - start

    def read(self, stored: Path, output: Path, workload: Workload) -> float:
        output.mkdir()
        identity = str(self._identity)
        start = time.perf_counter()
        if workload.files == 1:
            for relative in tree_files(stored):
                run_command(["age", "-d", "-i", identity, "-o",
                             str(output / relative.removesuffix(".age")), str(stored / relative)],
                            self._timeout)
        else:
            run_pipeline(["age", "-d", "-i", identity, str(stored / "tree.tar.age")],
                         ["tar", "-C", str(output), "-xf", "-"], self._timeout)
        return time.perf_counter() - start

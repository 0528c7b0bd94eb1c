"""Fault injection on the runtime: ``tdapp run`` killed with SIGKILL while the program runs
and while it uploads.

A DApp whose program sleeps when its inputs hold a file ``slow`` is started
with ``tdapp run``; once the program has written a marker into its output
volume the runtime's process group gets SIGKILL. In the second test the program
finishes and the runtime is killed halfway through its upload, to a push
service that takes part of the body and then stalls. Either way nothing may have
reached the CAS (output tag) or the transfer store, and a fresh push then runs
normally.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from walk_fixtures import PYTHON_HOST, Walk, output_tag, push, running_up, transfer_objects

from tdapp.runtime.mounts import fuse_usable

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is missing")

SHM = Path("/dev/shm")  # where tdapp run keeps plaintext


@pytest.fixture(scope="module")
def walk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Walk]:
    with running_up(tmp_path_factory.mktemp("walk")) as started:
        yield started


def processes_mentioning(token: str) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(
                errors="replace")
        except OSError:
            continue
        if token in cmdline:
            found.append(f"{entry.name}: {cmdline}")
    return found


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


@dataclass(frozen=True)
class Sleepy:
    marker: str
    script: str


@pytest.fixture(scope="module")
def sleepy(walk: Walk, tmp_path_factory: pytest.TempPathFactory) -> Sleepy:
    token = secrets.token_hex(6)
    marker = f"started-{token}"
    script = f"sleepy_{token}.py"
    app = tmp_path_factory.mktemp("sleepy")
    (app / script).write_text(
        "import os, shutil, time\n"
        "for name in sorted(os.listdir('/encryptedInputs')):\n"
        "    shutil.copy(os.path.join('/encryptedInputs', name),\n"
        "                os.path.join('/encryptedOutputs', name))\n"
        f"open('/encryptedOutputs/{marker}', 'w').write('running')\n"
        "if os.path.exists('/encryptedInputs/slow'):\n"
        "    time.sleep(300)\n")
    walk.tdapp("build", str(app), "--name", "sleepy", "-o",
               str(walk.example / "KEYS" / "sleepy.yml"),
               "--entrypoint", f"/usr/bin/python3 -I /{script}", "--heap", "256M",
               *PYTHON_HOST)
    return Sleepy(marker, script)


def start_run(walk: Walk, command: list[str], push_url: str, log: Path,
              *extra: str) -> subprocess.Popen[bytes]:
    with log.open("wb") as output:
        return subprocess.Popen(
            [sys.executable, "-m", "tdapp", "run", "sleepy", *command, "--push", push_url,
             *extra],
            cwd=walk.example, env=walk.env, stdin=subprocess.DEVNULL, stdout=output,
            stderr=output, start_new_session=True)


def kill_group(run: subprocess.Popen[bytes]) -> None:
    if run.poll() is None:
        os.killpg(run.pid, signal.SIGKILL)
    run.wait(timeout=15)


def rerun_succeeds(walk: Walk, monkeypatch: pytest.MonkeyPatch, before_tag: str,
                   before_objects: set[Path], marker: str) -> None:
    """A fresh push of the same application runs, publishes and decrypts normally."""
    again = push(walk, {"data.txt": "second\n"}, "sleepy", "sleepy.yml")
    url = walk.tdapp("run", "sleepy", *again, "--push", walk.push).stdout.strip()
    assert url.startswith("http://127.0.0.1:") and "\n" not in url
    assert output_tag(walk, monkeypatch) != before_tag
    assert len(transfer_objects(walk) - before_objects) >= 1
    zips = walk.example / "ZIP"
    subprocess.run(["curl", "--silent", "--show-error", "--fail", "--output",
                    str(zips / "out.zip"), url], check=True, timeout=60)
    walk.tdapp("decrypt")
    outputs = walk.example / "OUTPUTS"
    assert (outputs / "data.txt").read_text() == "second\n"
    assert (outputs / marker).read_text() == "running"
    assert not (outputs / "slow").exists()


@pytest.mark.timeout(120)
def test_sigkilled_run_moves_no_tag_uploads_nothing_and_a_fresh_push_runs(
        walk: Walk, sleepy: Sleepy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    marker, script = sleepy.marker, sleepy.script
    command = push(walk, {"slow": "", "data.txt": "first\n"}, "sleepy", "sleepy.yml")
    before_tag, before_objects = output_tag(walk, monkeypatch), transfer_objects(walk)
    log = tmp_path / "run.log"
    run = start_run(walk, command, walk.push, log)
    markers: list[Path] = []
    try:
        def started() -> bool:
            markers[:] = list(SHM.glob(f"tdapp-run-*/**/{marker}"))
            assert run.poll() is None, log.read_text(errors="replace")
            return bool(markers)

        wait_for(started, 60, "the program did not start within 60 s")
        time.sleep(0.5)
    finally:
        kill_group(run)
    assert run.returncode == -signal.SIGKILL

    # The sandboxed program dies with the runtime (bwrap --die-with-parent).
    wait_for(lambda: not processes_mentioning(script), 15,
             f"the program outlived the runtime: {processes_mentioning(script)}")
    assert output_tag(walk, monkeypatch) == before_tag
    assert transfer_objects(walk) == before_objects
    # A SIGKILLed runtime cannot remove its plaintext work folder itself; the next
    # run removes folders whose process is gone.
    abandoned = {next(p for p in path.parents if p.parent == SHM) for path in markers}
    assert abandoned and all(folder.exists() for folder in abandoned)

    rerun_succeeds(walk, monkeypatch, before_tag, before_objects, marker)
    assert not any(folder.exists() for folder in abandoned)


class StallingPushService:
    """Takes an upload's headers and part of its body, then never answers."""

    def __init__(self, stall_after: int) -> None:
        self.stall_after = stall_after
        self.received = 0
        self.closed = threading.Event()
        self.drain = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            connection, _ = self._listener.accept()
            first = connection.recv(65536)
            if first:
                break
            connection.close()  # the runtime's check that --push answers: no upload yet
        self.received += len(first)
        with connection:
            while self.received < self.stall_after:
                data = connection.recv(65536)
                if not data:
                    break
                self.received += len(data)
            # Stop reading until the sender is killed: it blocks mid-body once the
            # socket buffers fill. Then drain to see whether the connection ends.
            self.drain.wait(90)
            connection.settimeout(30)
            try:
                while connection.recv(65536):
                    pass
            except OSError:
                return
        self.closed.set()

    def close(self) -> None:
        self._listener.close()


@pytest.mark.timeout(120)
def test_run_killed_while_it_uploads_publishes_nothing_and_moves_no_tag(
        walk: Walk, sleepy: Sleepy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Incompressible output large enough that the upload is surely still going.
    big = secrets.token_hex(4 * 1024 * 1024)
    command = push(walk, {"big.txt": big}, "sleepy", "sleepy.yml")
    before_tag, before_objects = output_tag(walk, monkeypatch), transfer_objects(walk)
    stalling = StallingPushService(stall_after=1024 * 1024)
    log = tmp_path / "run.log"
    run = start_run(walk, command, stalling.url, log)
    try:
        def uploading() -> bool:
            assert run.poll() is None, log.read_text(errors="replace")
            return stalling.received >= stalling.stall_after

        wait_for(uploading, 90, "the runtime did not start its upload within 90 s")
        kill_group(run)
    finally:
        kill_group(run)
        stalling.drain.set()
        stalling.close()
    assert run.returncode == -signal.SIGKILL
    stalling.drain.set()
    assert stalling.closed.wait(15), "the killed runtime's connection stayed open"
    assert output_tag(walk, monkeypatch) == before_tag, "a tag moved before the upload finished"
    assert transfer_objects(walk) == before_objects
    rerun_succeeds(walk, monkeypatch, before_tag, before_objects, sleepy.marker)


def shield_mounts() -> list[str]:
    with open("/proc/mounts") as mounts:
        return [line.split()[1] for line in mounts if "tdapp-run-" in line.split()[1]]


@pytest.mark.timeout(120)
@pytest.mark.skipif(not fuse_usable(), reason="FUSE is not usable")
def test_sigkilled_run_with_the_fuse_shield_leaves_no_mount(
        walk: Walk, sleepy: Sleepy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    command = push(walk, {"slow": "", "data.txt": "first\n"}, "sleepy", "sleepy.yml")
    before_tag, before_objects = output_tag(walk, monkeypatch), transfer_objects(walk)
    log = tmp_path / "run.log"
    run = start_run(walk, command, walk.push, log, "--shield", "fuse")
    try:
        def started() -> bool:
            assert run.poll() is None, log.read_text(errors="replace")
            return any(Path(mount, sleepy.marker).exists() for mount in shield_mounts())

        wait_for(started, 60, "the program did not start within 60 s")
        assert len(shield_mounts()) == 2  # both volumes through the shield
    finally:
        kill_group(run)  # the shield's processes are not in this group
    wait_for(lambda: not shield_mounts(), 30, f"mounts outlived the run: {shield_mounts()}")
    wait_for(lambda: not processes_mentioning("--die-with-parent"), 30,
             "a shield process outlived the run")
    assert output_tag(walk, monkeypatch) == before_tag
    assert transfer_objects(walk) == before_objects
    rerun_succeeds(walk, monkeypatch, before_tag, before_objects, sleepy.marker)

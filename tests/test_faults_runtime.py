"""Fault injection on the runtime: ``tdapp run`` killed with SIGKILL while the program runs.

A DApp whose program sleeps when its inputs hold a file ``slow`` is started
with ``tdapp run``; once the program has written a marker into its output
volume the runtime's process group gets SIGKILL. Nothing may have reached the
CAS (output tag) or the transfer store, and a fresh push then runs normally.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from walk_fixtures import PYTHON_HOST, Walk, output_tag, push, running_up, transfer_objects

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


@pytest.mark.timeout(120)
def test_sigkilled_run_moves_no_tag_uploads_nothing_and_a_fresh_push_runs(
        walk: Walk, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    token = secrets.token_hex(6)
    marker = f"started-{token}"
    script = f"sleepy_{token}.py"
    app = tmp_path / "sleepy"
    app.mkdir()
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

    command = push(walk, {"slow": "", "data.txt": "first\n"}, "sleepy", "sleepy.yml")
    before_tag, before_objects = output_tag(walk, monkeypatch), transfer_objects(walk)
    log = tmp_path / "run.log"
    with log.open("wb") as output:
        run = subprocess.Popen(
            [sys.executable, "-m", "tdapp", "run", "sleepy", *command, "--push", walk.push],
            cwd=walk.example, env=walk.env, stdin=subprocess.DEVNULL, stdout=output,
            stderr=output, start_new_session=True)
    markers: list[Path] = []
    try:
        def started() -> bool:
            markers[:] = list(SHM.glob(f"tdapp-run-*/**/{marker}"))
            assert run.poll() is None, log.read_text(errors="replace")
            return bool(markers)

        wait_for(started, 60, "the program did not start within 60 s")
        time.sleep(0.5)
        os.killpg(run.pid, signal.SIGKILL)
        run.wait(timeout=15)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait(timeout=15)
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

    # The same application runs normally from a fresh push.
    again = push(walk, {"data.txt": "second\n"}, "sleepy", "sleepy.yml")
    url = walk.tdapp("run", "sleepy", *again, "--push", walk.push).stdout.strip()
    assert not any(folder.exists() for folder in abandoned)
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

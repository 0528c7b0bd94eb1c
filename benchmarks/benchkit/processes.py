"""Running things: the progress log, deadlines, commands, pipelines and FUSE unmounts."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

COMMAND_TIMEOUT_S = 60.0


def log(message: str) -> None:
    """A progress line on stderr (stdout is kept for the report)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def deadline(seconds: float, what: str) -> Iterator[None]:
    """Raise TimeoutError in this thread if the block runs longer than ``seconds``."""

    def expire(_signum: int, _frame: FrameType | None) -> None:
        raise TimeoutError(f"{what} took longer than {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_command(command: list[str], timeout: float = COMMAND_TIMEOUT_S) -> None:
    """Run a command; its output goes to a file (a daemon may keep pipes open)."""
    with tempfile.TemporaryFile() as output:
        completed = subprocess.run(command, stdin=subprocess.DEVNULL, stdout=output,
                                   stderr=output, timeout=timeout, check=False)
        if completed.returncode != 0:
            output.seek(0)
            text = output.read().decode(errors="replace").strip()[-300:]
            raise RuntimeError(f"{command[0]} exited with {completed.returncode}: {text}")


def run_pipeline(producer_cmd: list[str], consumer_cmd: list[str], timeout: float) -> None:
    """``producer | consumer``; both are killed if anything goes wrong."""
    with subprocess.Popen(producer_cmd, stdout=subprocess.PIPE) as producer:
        assert producer.stdout is not None
        try:
            with subprocess.Popen(consumer_cmd, stdin=producer.stdout) as consumer:
                producer.stdout.close()
                try:
                    consumer.wait(timeout)
                finally:
                    consumer.kill()
            producer.wait(timeout)
        finally:
            producer.kill()
    for name, code in ((producer_cmd[0], producer.returncode),
                       (consumer_cmd[0], consumer.returncode)):
        if code != 0:
            raise RuntimeError(f"{name} exited with {code}")


def unmount(mount_point: Path) -> None:
    """Unmount a FUSE mount; lazily if a plain unmount does not take."""
    attempts = [[tool, "-u"] for tool in ("fusermount3", "fusermount") if shutil.which(tool)]
    attempts += [[tool, "-uz"] for tool in ("fusermount3", "fusermount") if shutil.which(tool)]
    for attempt in attempts:
        if not os.path.ismount(mount_point):
            return
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            run_command([*attempt, str(mount_point)])
    if os.path.ismount(mount_point):
        raise RuntimeError(f"could not unmount {mount_point}")

"""Running things: the progress log, deadlines, commands, pipelines, FUSE mounts and unmounts."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO

COMMAND_TIMEOUT_S = 60.0
STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT})


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


def is_mount(path: Path) -> bool:
    """``os.path.ismount``, but also true for a FUSE mount whose server died (ENOTCONN)."""
    try:
        os.lstat(path)
    except OSError as error:
        return error.errno == errno.ENOTCONN
    return os.path.ismount(path)


def unmount(mount_point: Path) -> None:
    """Unmount a FUSE mount; lazily if a plain unmount does not take."""
    attempts = [[tool, "-u"] for tool in ("fusermount3", "fusermount") if shutil.which(tool)]
    attempts += [[tool, "-uz"] for tool in ("fusermount3", "fusermount") if shutil.which(tool)]
    for attempt in attempts:
        if not is_mount(mount_point):
            return
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            run_command([*attempt, str(mount_point)])
    if is_mount(mount_point):
        raise RuntimeError(f"could not unmount {mount_point}")


def _tail(output: IO[bytes], limit: int = 300) -> str:
    output.seek(0)
    return output.read().decode(errors="replace").strip()[-limit:]


class ForegroundMount:
    """A FUSE file system served by a process in the foreground, for one ``with`` block.

    Entering starts ``command`` and waits until ``mount_point`` is a mount (failing if the
    process exits first or ``ready_timeout`` passes); it returns the mount point. Leaving
    unmounts it (``unmount``: fusermount -u, then lazily; SIGTERM if even that fails) and
    waits for the process to exit, which must be with status 0. Afterwards ``stdout`` holds
    what the process printed and ``stop_s`` the seconds from the unmount to its exit.
    """

    def __init__(self, command: list[str], mount_point: Path, *,
                 env: Mapping[str, str] | None = None, ready_timeout: float = 30.0,
                 stop_timeout: float = 300.0) -> None:
        self._command, self._mount_point, self._env = command, mount_point, env
        self._ready_timeout, self._stop_timeout = ready_timeout, stop_timeout
        self._process: subprocess.Popen[bytes] | None = None
        self._stdout: IO[bytes] | None = None
        self._stderr: IO[bytes] | None = None
        self.stdout = ""
        self.stop_s = 0.0

    def __enter__(self) -> Path:
        self._stdout, self._stderr = tempfile.TemporaryFile(), tempfile.TemporaryFile()
        # SIGTERM and SIGINT wait until the process is known (and so can be stopped): an
        # exception raised by their handlers inside Popen would leave a server nobody stops.
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            try:
                self._process = subprocess.Popen(
                    self._command, stdin=subprocess.DEVNULL, stdout=self._stdout,
                    stderr=self._stderr, env=None if self._env is None else dict(self._env),
                    start_new_session=True,
                    preexec_fn=lambda: signal.pthread_sigmask(signal.SIG_SETMASK, previous))
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, previous)
            self._wait_until_mounted(self._process)
        except BaseException:
            if self._process is not None and not is_mount(self._mount_point):
                self._process.terminate()  # never mounted: nothing to unmount or wait for
            self._stop(quietly=True)
            raise
        return self._mount_point

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self._stop(quietly=kind is not None)

    def _wait_until_mounted(self, process: subprocess.Popen[bytes]) -> None:
        name = os.path.basename(self._command[0])
        ready_by = time.monotonic() + self._ready_timeout
        while not os.path.ismount(self._mount_point):
            if process.poll() is not None:
                assert self._stderr is not None
                raise RuntimeError(f"{name} exited with {process.returncode} before mounting "
                                   f"{self._mount_point}: {_tail(self._stderr)}")
            if time.monotonic() > ready_by:
                raise RuntimeError(f"{name} did not mount {self._mount_point} within "
                                   f"{self._ready_timeout:.0f} s")
            time.sleep(0.02)

    def _stop(self, quietly: bool) -> None:
        """Unmount, wait for the exit; raise on a failure unless ``quietly`` (already failing)."""
        process, stdout, stderr = self._process, self._stdout, self._stderr
        assert stdout is not None and stderr is not None
        if process is None:  # it did not start
            stdout.close()
            stderr.close()
            return
        start = time.perf_counter()
        try:
            try:
                unmount(self._mount_point)
            except RuntimeError:
                if process.poll() is None:
                    process.terminate()
            try:
                process.wait(self._stop_timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                if not quietly:
                    raise RuntimeError(f"{os.path.basename(self._command[0])} did not exit within "
                                       f"{self._stop_timeout:.0f} s of the unmount") from None
            self.stop_s = time.perf_counter() - start
            self.stdout = _tail(stdout, 100_000)
            if process.returncode != 0 and not quietly:
                raise RuntimeError(f"{os.path.basename(self._command[0])} exited with "
                                   f"{process.returncode}: {_tail(stderr)}")
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            with contextlib.suppress(RuntimeError):
                unmount(self._mount_point)  # mounted late, or left by a server that died
            stdout.close()
            stderr.close()

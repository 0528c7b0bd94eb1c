"""Start bubblewrap and see the sandboxed program to its end (for :mod:`tdapp.runtime.sandbox`).

:func:`run_bwrap` starts ``bwrap --args N -- PROGRAM…`` with an **empty
environment**: every option (environment values, host paths, injected files'
descriptors) travels over the pipe ``N``, and each injected file's content over
a pipe of its own, so no other local user can read any of them in
``/proc/PID/cmdline`` and no environment of the runtime reaches bwrap. A
descriptor number in the options is a typed reference (:class:`Fd`), resolved by
position once the descriptor exists: no text of the session is ever searched or
rewritten. Resource limits go through a tiny launcher (``python -I -S -c …``)
whose only arguments are the two limits and bwrap's command line.

The program is pid 1 of its pid namespace (``--as-pid-1``); bwrap reports its
pid on ``--info-fd`` and a pidfd is taken on it right away. At the timeout it
gets SIGKILL through that pidfd, which the kernel extends to every process of
the namespace (whatever they ignore, stop or fork); bwrap's process group gets
SIGKILL too. If the runtime itself dies, bwrap dies with it and the program
gets the death signal ``--die-with-parent`` gave it; a seccomp filter
(``--seccomp``, :func:`death_signal_filter`) makes ``prctl(PR_SET_PDEATHSIG, …)``
succeed without effect, so the program cannot clear that signal and outlive the
runtime. The filter is known for x86-64 (with its i386 and x32 calls) and
AArch64; on another machine there is none and a program can outlive a killed
runtime until it ends by itself.

This module must never pass anything to bwrap through its argv or environment
but the program's own command line, and never return while bwrap runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import signal
import struct
import subprocess
import sys
import threading
from dataclasses import dataclass
from enum import Enum
from typing import BinaryIO

from tdapp.errors import InputError, UnavailableError

TAIL_BYTES = 64 * 1024
"""How much of the end of stdout and stderr is kept for messages."""

_LAUNCHER = (
    "import os,resource,sys\n"
    "for r,v in ((resource.RLIMIT_AS,int(sys.argv[1])),(resource.RLIMIT_STACK,int(sys.argv[2]))):\n"
    "    if v>=0: resource.setrlimit(r,(v,v))\n"
    "os.execv(sys.argv[3],sys.argv[3:])\n"
)
_INFO_MAX = 65536


class Descriptor(Enum):
    """Kinds of descriptor whose number bubblewrap's options name."""

    INJECTED_FILE = "injected file"
    INFO = "info"
    SECCOMP = "seccomp"


# seccomp: (AUDIT_ARCH_…, prctl's numbers under it) for each machine the filter knows.
_PRCTL_CALLS = {
    "x86_64": ((0xC000003E, (157, 0x40000000 | 157)), (0x40000003, (172,))),
    "aarch64": ((0xC00000B7, (167,)),),
}
_PR_SET_PDEATHSIG = 1
_LD_ABS, _JEQ, _RET = 0x20, 0x15, 0x06  # BPF_LD|BPF_W|BPF_ABS, BPF_JMP|BPF_JEQ|BPF_K, BPF_RET
_ARCH_AT, _NR_AT, _ARG0_AT = 4, 0, 16  # offsets in struct seccomp_data (arg0's low half)
_RET_ALLOW, _RET_ERRNO = 0x7FFF0000, 0x00050000


def death_signal_filter(machine: str | None = None) -> bytes | None:
    """A classic BPF seccomp program: ``prctl(PR_SET_PDEATHSIG, …)`` returns 0 and does
    nothing, every other call is allowed. None for a machine it does not know.

    Layout: ``ld arch``; one ``jeq`` per known arch to its block; ``allow``; each
    block ``ld nr``, one ``jeq`` per prctl number to the check, ``allow``; the check
    ``ld arg0``, ``jeq PR_SET_PDEATHSIG`` to the last, ``allow``, ``errno 0``.
    """
    arches = _PRCTL_CALLS.get(machine or platform.machine())
    if arches is None:
        return None
    block_starts, position = [], 1 + len(arches) + 1
    for _, numbers in arches:
        block_starts.append(position)
        position += 1 + len(numbers) + 1
    check = position
    code: list[tuple[int, int, int, int]] = [(_LD_ABS, 0, 0, _ARCH_AT)]
    for (arch, _), start in zip(arches, block_starts, strict=True):
        code.append((_JEQ, start - len(code) - 1, 0, arch))  # jumps count from the next
    code.append((_RET, 0, 0, _RET_ALLOW))
    for _, numbers in arches:
        code.append((_LD_ABS, 0, 0, _NR_AT))
        code += [(_JEQ, check - len(code) - 1 - i, 0, nr) for i, nr in enumerate(numbers)]
        code.append((_RET, 0, 0, _RET_ALLOW))
    code += [(_LD_ABS, 0, 0, _ARG0_AT), (_JEQ, 1, 0, _PR_SET_PDEATHSIG),
             (_RET, 0, 0, _RET_ALLOW), (_RET, 0, 0, _RET_ERRNO)]
    return b"".join(struct.pack("=HBBI", *instruction) for instruction in code)


@dataclass(frozen=True)
class Fd:
    """A descriptor's number in bubblewrap's options: ``index`` among those of ``kind``."""

    kind: Descriptor
    index: int = 0


Option = str | Fd


@dataclass(frozen=True)
class Ended:
    """How bwrap ended: its status (negative: killed by that signal) and the output tails."""

    returncode: int
    timed_out: bool
    stdout: str
    stderr: str


def find_bwrap() -> str:
    path = shutil.which("bwrap")
    if path is None:
        raise UnavailableError(
            "bubblewrap (bwrap) is not installed; install the 'bubblewrap' package to run programs"
        )
    return path


def options_data(options: list[Option], fds: dict[Descriptor, list[int]]) -> bytes:
    """The NUL-separated options for ``--args``, each descriptor reference resolved."""
    data = bytearray()
    for option in options:
        text = str(fds[option.kind][option.index]) if isinstance(option, Fd) else option
        encoded = os.fsencode(text)
        if b"\0" in encoded:
            raise InputError(f"a sandbox option holds a NUL character: {text!r}")
        data += encoded + b"\0"
    return bytes(data)


class _Pump(threading.Thread):
    """Copies one pipe to the runtime's stderr, keeping its tail."""

    def __init__(self, fd: int, echo: BinaryIO | None, lock: threading.Lock) -> None:
        super().__init__(daemon=True)
        self.fd, self.echo, self.lock = fd, echo, lock
        self.tail = bytearray()

    def run(self) -> None:
        try:
            while chunk := os.read(self.fd, 65536):
                self.tail += chunk
                if len(self.tail) > TAIL_BYTES:
                    del self.tail[: len(self.tail) - TAIL_BYTES]
                if self.echo is not None:
                    with self.lock, contextlib.suppress(OSError, ValueError):
                        self.echo.write(chunk)
                        self.echo.flush()
        finally:
            os.close(self.fd)

    def text(self) -> str:
        return bytes(self.tail).decode("utf-8", errors="replace")


def _feed(fd: int, data: bytes) -> None:
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    except OSError:
        pass  # bwrap ended before reading it: its failure is reported by the exit status


class _Program(threading.Thread):
    """Reads bwrap's ``--info-fd`` report and holds a pidfd on the program (pid 1 of the
    sandbox), checked to be bwrap's child so that a reused pid is never signalled."""

    def __init__(self, fd: int, bwrap_pid: int) -> None:
        super().__init__(daemon=True)
        self.fd, self.bwrap_pid = fd, bwrap_pid
        self.pidfd: int | None = None

    def run(self) -> None:
        report = b""
        try:
            while len(report) < _INFO_MAX and (chunk := os.read(self.fd, 4096)):
                report += chunk
                try:
                    pid = int(json.loads(report)["child-pid"])
                except (ValueError, KeyError, TypeError):
                    continue  # not all of it yet
                self._hold(pid)
                return
        finally:
            os.close(self.fd)

    def _hold(self, pid: int) -> None:
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            return  # already gone
        try:
            with open(f"/proc/{pid}/stat", "rb") as stat:
                parent = int(stat.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            parent = -1
        if parent == self.bwrap_pid:
            self.pidfd = pidfd
        else:
            os.close(pidfd)

    def kill(self) -> None:
        if self.pidfd is not None:
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)

    def close(self) -> None:
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None


def _launch(command: list[str], options: list[Option], files: list[bytes],
            rlimits: tuple[int, int] | None, echo: bool
            ) -> tuple[subprocess.Popen[bytes], _Program, list[threading.Thread], list[_Pump]]:
    seccomp = death_signal_filter()
    if seccomp is not None:
        options = ["--seccomp", Fd(Descriptor.SECCOMP), *options]
        files = [*files, seccomp]  # the filter's pipe is the last one
    data_pipes = [os.pipe() for _ in files]
    args_r, args_w = os.pipe()
    info_r, info_w = os.pipe()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    data_reads = [r for r, _ in data_pipes]
    try:
        data = options_data(options, {Descriptor.INFO: [info_w],
                                      Descriptor.INJECTED_FILE: data_reads,
                                      Descriptor.SECCOMP: data_reads[-1:]})
        cmd = [find_bwrap(), "--args", str(args_r), "--", *command]
        if rlimits is not None:
            cmd = [sys.executable, "-I", "-S", "-c", _LAUNCHER, *map(str, rlimits), *cmd]
        proc = subprocess.Popen(
            cmd, env={}, stdin=subprocess.DEVNULL, stdout=out_w, stderr=err_w,
            pass_fds=[args_r, info_w, *data_reads], start_new_session=True, close_fds=True)
    except BaseException as exc:
        for fd in (args_w, info_r, out_r, err_r, *(w for _, w in data_pipes)):
            os.close(fd)
        if isinstance(exc, OSError):
            raise UnavailableError(f"cannot start bubblewrap: {exc.strerror}") from exc
        raise
    finally:
        for fd in (args_r, info_w, out_w, err_w, *data_reads):
            os.close(fd)
    program = _Program(info_r, proc.pid)
    feeders = [threading.Thread(target=_feed, args=(fd, content), daemon=True)
               for fd, content in [(args_w, data),
                                   *zip((w for _, w in data_pipes), files, strict=True)]]
    lock = threading.Lock()
    stream = getattr(sys.stderr, "buffer", None) if echo else None
    pumps = [_Pump(out_r, stream, lock), _Pump(err_r, stream, lock)]
    for thread in [program, *feeders, *pumps]:
        thread.start()
    return proc, program, feeders, pumps


def run_bwrap(command: list[str], options: list[Option], files: list[bytes], *,
              rlimits: tuple[int, int] | None, timeout: float | None, echo: bool) -> Ended:
    """Run bwrap with ``options`` over ``--args``, then ``-- command``; ``files`` are the
    contents of the :attr:`Descriptor.INJECTED_FILE` references, in order. ``rlimits`` is
    (RLIMIT_AS, RLIMIT_STACK), -1 for none. With ``echo`` the output is copied to stderr."""
    proc, program, feeders, pumps = _launch(command, options, files, rlimits, echo)
    timed_out = False
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        if proc.returncode is None:
            program.join(timeout=1)  # the report comes right after bwrap's clone
            program.kill()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        program.join(timeout=1)
        program.close()
    for pump in pumps:
        pump.join(timeout=5)
    for feeder in feeders:
        feeder.join(timeout=1)
    return Ended(proc.returncode, timed_out, pumps[0].text(), pumps[1].text())

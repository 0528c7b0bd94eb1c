"""Several server processes on one port: ``tdapp cas serve --workers N``.

The parent binds N listening sockets to the same address with ``SO_REUSEPORT``
(so a port that cannot be bound is one clear error before anything starts, and
``--port 0`` names one port for all), then forks N workers, each of which runs
the whole server on its own socket; the kernel spreads new connections over
them. A worker that dies (a crash, ``SIGKILL``) is started again on the same
socket, unless workers die faster than :data:`MAX_RESTARTS` in
:data:`RESTART_WINDOW` seconds, which stops them all (something is wrong that a
restart will not cure); connections the kernel gave the dead worker's socket
meanwhile wait in its queue for the new one. SIGTERM or SIGINT to the parent
stops every worker cleanly, and a worker whose parent dies (even by SIGKILL)
is sent SIGTERM by the kernel.

What a worker holds is its own: its database connections, caches, rate-limit
buckets and metrics (docs/operations.md, "Several CAS processes"). Anything that
must hold across workers is the database's business. This module must never
fork once threads or an event loop exist in the parent (it forks first thing),
and never leaves a worker running after the parent returns.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import signal
import socket
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from types import FrameType

from tdapp.errors import UnavailableError, UsageError

MAX_WORKERS = 64
MAX_RESTARTS = 5
RESTART_WINDOW = 30.0
READY_TIMEOUT = 120.0
STOP_TIMEOUT = 15.0

Worker = Callable[[socket.socket, int, Callable[[], None]], None]
"""A worker's body: serve on the socket until SIGTERM; call the callback once listening."""


def reuseport_sockets(host: str, port: int, count: int) -> list[socket.socket]:
    """``count`` listening TCP sockets on one address, bound with ``SO_REUSEPORT``."""
    if not 1 <= count <= MAX_WORKERS:
        raise UsageError(f"--workers {count}: expected 1 to {MAX_WORKERS}")
    if not hasattr(socket, "SO_REUSEPORT"):
        raise UsageError("--workers above 1 needs SO_REUSEPORT (Linux, BSD, macOS)")
    sockets: list[socket.socket] = []
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        for _ in range(count):
            sock = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, port))
            port = sock.getsockname()[1]  # --port 0: every socket on the first one's port
            sock.listen(1024)
            sock.setblocking(False)
    except OSError as error:
        for sock in sockets:
            sock.close()
        raise UnavailableError(f"cannot listen on {host}:{port}: "
                               f"{error.strerror or error}") from None
    return sockets


def run_workers(sockets: list[socket.socket], worker: Worker,
                started: Callable[[], None]) -> None:
    """Run one forked worker per socket until SIGTERM/SIGINT; ``started`` once all listen."""
    context = multiprocessing.get_context("fork")
    stopping = False

    def stop(_signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGTERM,
                                                                    signal.SIGINT)}
    processes: dict[int, BaseProcess] = {}
    deaths: list[float] = []
    try:
        waiting = [_start(context, worker, sock, index, processes)
                   for index, sock in enumerate(sockets)]
        _await_ready(waiting, processes, lambda: stopping)
        if not stopping:
            started()
        while not stopping:
            for index, process in list(processes.items()):
                if process.is_alive():
                    continue
                process.join()
                now = time.monotonic()
                deaths[:] = [at for at in deaths if now - at < RESTART_WINDOW] + [now]
                if len(deaths) > MAX_RESTARTS:
                    raise UnavailableError(
                        f"CAS workers died {len(deaths)} times in {RESTART_WINDOW:g} s "
                        f"(the last with exit code {process.exitcode}); stopping")
                _await_ready([_start(context, worker, sockets[index], index, processes)],
                             processes, lambda: stopping)
            time.sleep(0.2)
    finally:
        _stop_all(processes)
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _start(context: multiprocessing.context.ForkContext, worker: Worker,
           sock: socket.socket, index: int,
           processes: dict[int, BaseProcess]) -> tuple[int, Connection]:
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_worker_main, args=(worker, sock, index, sender),
                              name=f"tdapp-cas-worker-{index}", daemon=True)
    process.start()
    sender.close()
    processes[index] = process
    return index, receiver


def _worker_main(worker: Worker, sock: socket.socket, index: int, ready: Connection) -> None:
    # The parent's handlers only set its own flag: a worker stops on SIGTERM by itself
    # (serve_until_signalled), and a ^C in the terminal reaches the parent, which stops it.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = os.getppid()
    _die_with_parent()
    if os.getppid() != parent:  # the parent died before the line above took effect
        return

    def listening() -> None:
        ready.send(os.getpid())
        ready.close()

    worker(sock, index, listening)


def _die_with_parent() -> None:
    """SIGTERM this process when its parent dies, even by SIGKILL (Linux); elsewhere the
    parent's own stop is all there is."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


_PR_SET_PDEATHSIG = 1


def _await_ready(waiting: list[tuple[int, Connection]], processes: dict[int, BaseProcess],
                 stopping: Callable[[], bool]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    for index, receiver in waiting:
        try:
            while not receiver.poll(0.2):
                if stopping():
                    return
                if not processes[index].is_alive() or time.monotonic() > deadline:
                    raise UnavailableError(
                        f"CAS worker {index} did not start (exit code "
                        f"{processes[index].exitcode}); see the messages above")
            receiver.recv()
        except EOFError:
            raise UnavailableError(f"CAS worker {index} stopped while starting") from None
        finally:
            receiver.close()


def _stop_all(processes: dict[int, BaseProcess]) -> None:
    for process in processes.values():
        if process.is_alive() and process.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT
    for process in processes.values():
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join()

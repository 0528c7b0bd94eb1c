"""Attacks on the sandbox, by the DApp itself and by another local user.

The DApp is a Python probe run with the host's interpreter (bound read-only as a
host path). Where the attack needs the run to be live, the probe writes
``/sync/ready.json`` into a writable volume and waits for ``/sync/go``, while
the test looks at the host's ``/proc`` as any local user can.
"""

from __future__ import annotations

import concurrent.futures
import errno
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from tdapp.errors import ProgramFailedError
from tdapp.runtime.sandbox import Mount, SandboxResult, SandboxSpec, require_success, run_sandboxed

PYTHON = "/usr/bin/python3"
pytestmark = [
    pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap (bwrap) is not installed"),
    pytest.mark.skipif(not os.path.exists(PYTHON), reason="no /usr/bin/python3 on this host"),
]
HOST_PATHS = ["/usr/bin/python3*", "/usr/lib", *[p for p in ("/lib", "/lib64")
                                                 if os.path.exists(p)]]
MIB = 1024 * 1024

PROBE = r'''
import ctypes, errno, json, os, signal, sys, time

libc = ctypes.CDLL(None, use_errno=True)
libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
PTRACE_ATTACH, PTRACE_DETACH, PR_SET_PDEATHSIG = 16, 17, 1


def ready(**info):
    info["pidns"] = os.readlink("/proc/self/ns/pid")
    with open("/sync/ready.tmp", "w") as f:
        json.dump(info, f)
    os.rename("/sync/ready.tmp", "/sync/ready.json")
    for _ in range(12000):
        if os.path.exists("/sync/go"):
            return
        time.sleep(0.01)


def pids():
    return sorted(int(p) for p in os.listdir("/proc") if p.isdigit())


def read(path):
    try:
        with open(path, "rb") as f:
            return f.read().decode(errors="replace")
    except OSError as e:
        return f"<{e.strerror}>"


def attach(pid):
    if libc.ptrace(PTRACE_ATTACH, pid, None, None) == 0:
        return "attached"
    return errno.errorcode.get(ctypes.get_errno(), "?")


def fill(path, limit):
    written = 0
    try:
        with open(path, "wb") as f:
            while written < limit:
                f.write(b"x" * (1 << 20))
                f.flush()
                written += 1 << 20
        return written, None
    except OSError as e:
        return written, errno.errorcode.get(e.errno, "?")


mode = sys.argv[1]
if mode == "proc":
    print(json.dumps({p: {"cmdline": read(f"/proc/{p}/cmdline"),
                          "environ": read(f"/proc/{p}/environ")} for p in pids()}))
elif mode == "ptrace":
    me, results = os.getpid(), {}
    for pid in sorted({*pids(), os.getppid(), 1} - {me, 0}):
        results[pid] = attach(pid)
        if results[pid] == "attached":
            os.waitpid(pid, 0x40000000)  # __WALL
            libc.ptrace(PTRACE_DETACH, pid, None, None)
    results["parent"] = os.getppid()
    print(json.dumps(results))
elif mode == "stop-parent":
    parent = os.getppid()
    print(json.dumps({"parent": parent, "attach": attach(parent) if parent else "no parent"}))
    if parent:
        os.kill(parent, signal.SIGSTOP)
elif mode == "env":
    print(json.dumps({"env": dict(os.environ), "argv": sys.argv[2:],
                      "file": read("/etc/app/secret.conf"),
                      "file_mode": os.stat("/etc/app/secret.conf").st_mode & 0o7777}))
elif mode == "wait":
    ready()
elif mode == "hang":
    time.sleep(3600)
elif mode == "stubborn":
    libc.prctl(PR_SET_PDEATHSIG, 0, 0, 0, 0)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    if os.fork() == 0:
        os.setsid()
        libc.prctl(PR_SET_PDEATHSIG, 0, 0, 0, 0)
        time.sleep(3600)
        os._exit(0)
    stopped = os.fork()
    if stopped == 0:
        os.kill(os.getpid(), signal.SIGSTOP)
        os._exit(0)
    os.waitpid(stopped, os.WUNTRACED)
    with open("/sync/ready.json", "w") as f:
        f.write("{}")
    while True:
        try:
            os.wait()
        except ChildProcessError:
            time.sleep(1)
elif mode == "immortal":
    libc.prctl(PR_SET_PDEATHSIG, 0, 0, 0, 0)
    death_signal = ctypes.c_int(-1)
    libc.prctl(2, ctypes.byref(death_signal), 0, 0, 0)  # PR_GET_PDEATHSIG
    with open("/sync/ready.json", "w") as f:
        json.dump({"death_signal": death_signal.value}, f)
    time.sleep(3600)
elif mode == "fill":
    limit = int(sys.argv[2])
    tmp, shm = fill("/tmp/big", limit), fill("/dev/shm/big", limit)
    ready(tmp=tmp, shm=shm)
elif mode == "tmp-size":
    st = os.statvfs("/tmp")
    print(st.f_blocks * st.f_frsize)
elif mode == "own-tmpfs":
    CLONE_NEWUSER, CLONE_NEWNS = 0x10000000, 0x00020000
    uid, gid = os.getuid(), os.getgid()
    if libc.unshare(CLONE_NEWUSER | CLONE_NEWNS) != 0:
        print(json.dumps({"unshare": errno.errorcode.get(ctypes.get_errno(), "?")}))
        sys.exit(0)
    for name, text in (("uid_map", f"0 {uid} 1"), ("setgroups", "deny"),
                       ("gid_map", f"0 {gid} 1")):
        with open(f"/proc/self/{name}", "w") as f:
            f.write(text)
    os.makedirs("/tmp/mine", exist_ok=True)
    mounted = libc.mount(b"none", b"/tmp/mine", b"tmpfs", 0, None) == 0
    print(json.dumps({"unshare": "ok", "mounted": mounted,
                      "filled": fill("/tmp/mine/big", int(sys.argv[2])) if mounted else None}))
'''


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("attack-image") / "rootfs"
    (root / "srv").mkdir(parents=True)
    (root / "srv" / "probe.py").write_text(PROBE)
    return root


def spec(image: Path, *args: str, **kw: Any) -> SandboxSpec:
    base = SandboxSpec(root=image, argv=[PYTHON, "-I", "/srv/probe.py", *args],
                       env={"PATH": "/usr/bin", "LANG": "C.UTF-8"}, cwd="/", mounts=[],
                       host_paths=HOST_PATHS, memory_limit=512 * MIB, timeout=60)
    return replace(base, **kw)


def output(result: SandboxResult) -> Any:
    require_success(result)
    return json.loads(result.stdout_tail)


@dataclass
class Process:
    pid: int
    cmdline: bytes
    environ: bytes
    pidns: str | None


def host_processes() -> Iterator[Process]:
    """Every process on the host, as root sees it in /proc."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue  # ended meanwhile
        try:
            pidns: str | None = os.readlink(entry / "ns" / "pid")
        except OSError:
            pidns = None
        yield Process(int(entry.name), cmdline, environ, pidns)


class Live:
    """A run in a thread, its probe waiting in ``ready()`` until :meth:`release`."""

    def __init__(self, sandbox: SandboxSpec, sync: Path) -> None:
        self.sync = sync
        self._pool = concurrent.futures.ThreadPoolExecutor(1)
        self._future = self._pool.submit(run_sandboxed, sandbox, echo=False)

    def wait_ready(self) -> dict[str, Any]:
        deadline = time.monotonic() + 60
        while not (self.sync / "ready.json").exists():
            if self._future.done():
                pytest.fail(f"the probe ended before it was ready: {self._future.result()}")
            assert time.monotonic() < deadline, "the probe did not get ready"
            time.sleep(0.01)
        info: dict[str, Any] = json.loads((self.sync / "ready.json").read_text())
        return info

    def release(self) -> SandboxResult:
        (self.sync / "go").touch()
        try:
            return self._future.result(timeout=60)
        finally:
            self._pool.shutdown()


@pytest.fixture
def sync(tmp_path: Path) -> Path:
    folder = tmp_path / "sync"
    folder.mkdir()
    return folder


def with_sync(sandbox: SandboxSpec, sync: Path) -> SandboxSpec:
    return replace(sandbox, mounts=[*sandbox.mounts, Mount(sync, "/sync", True)])


# ---------------------------------------------------------------- the DApp


def test_the_dapp_finds_no_runtime_environment_or_host_path_in_proc(
        image: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    marker = secrets.token_hex(16)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", marker)
    monkeypatch.setenv("VOLUME_KEY", marker)
    monkeypatch.setenv("TDAPP_HOME", str(tmp_path / "home"))
    seen = output(run_sandboxed(spec(image, "proc"), echo=False))
    text = json.dumps(seen)
    assert marker not in text
    assert str(image) not in text and str(tmp_path) not in text
    assert "bwrap" not in text
    for pid, process in seen.items():  # only the program itself, with the session's env
        assert process["cmdline"].split("\0")[:3] == [PYTHON, "-I", "/srv/probe.py"], pid
        names = {item.split("=", 1)[0] for item in process["environ"].split("\0") if item}
        assert names <= {"PATH", "LANG", "PWD", "LC_CTYPE"}, pid


def test_the_dapp_can_ptrace_no_process_outside_itself_and_the_run_ends(image: Path) -> None:
    result = run_sandboxed(spec(image, "ptrace", timeout=20), echo=False)
    assert not result.timed_out
    attempts = output(result)
    assert "attached" not in attempts.values(), attempts


def test_a_dapp_stopping_its_parent_does_not_stop_the_run(image: Path) -> None:
    result = run_sandboxed(spec(image, "stop-parent", timeout=20), echo=False)
    assert not result.timed_out, "the run was held until its time limit"
    assert output(result)["attach"] != "attached"


def test_a_placeholder_like_value_reaches_the_program_unchanged(image: Path) -> None:
    env = {"PATH": "/usr/bin", "A": "{fd:0}", "B": "{fd:1}"}
    files = {"/etc/app/secret.conf": b"the injected file"}
    seen = output(run_sandboxed(spec(image, "env", "{fd:0}", env=env, files=files),
                                echo=False))
    assert seen["env"]["A"] == "{fd:0}" and seen["env"]["B"] == "{fd:1}"
    assert seen["argv"] == ["{fd:0}"]
    assert seen["file"] == "the injected file"


def test_an_injected_file_has_the_permission_the_session_gives(image: Path) -> None:
    files = {"/etc/app/secret.conf": b"the injected file"}
    seen = output(run_sandboxed(spec(image, "env", files=files,
                                     file_modes={"/etc/app/secret.conf": 0o400}), echo=False))
    assert seen["file_mode"] == 0o400


# ------------------------------------------------------ another local user


def test_no_session_secret_is_on_any_host_command_line_or_environment(
        image: Path, sync: Path) -> None:
    env_secret, file_secret = secrets.token_hex(16), secrets.token_hex(16)
    sandbox = with_sync(spec(image, "wait", env={"PATH": "/usr/bin", "API_TOKEN": env_secret},
                             files={"/etc/app/secret.conf": file_secret.encode()}), sync)
    live = Live(sandbox, sync)
    try:
        program_ns = live.wait_ready()["pidns"]
        outside = [p for p in host_processes() if p.pidns != program_ns]
        assert any(b"bwrap" in p.cmdline for p in outside)  # the scan does see the sandbox
        for process in outside:
            for secret in (env_secret, file_secret):
                assert secret.encode() not in process.cmdline, process
                assert secret.encode() not in process.environ, process
            if b"bwrap" in process.cmdline:
                assert str(image).encode() not in process.cmdline, process
    finally:
        require_success(live.release())


# ------------------------------------------------------------ time limits


def program_processes(token: str) -> list[int]:
    return [p.pid for p in host_processes() if token.encode() in p.cmdline]


def test_a_hanging_program_is_killed_at_its_time_limit(image: Path) -> None:
    token = secrets.token_hex(8)
    result = run_sandboxed(spec(image, "hang", token, timeout=1), echo=False)
    assert result.timed_out and result.time_limit == 1
    with pytest.raises(ProgramFailedError, match=r"time limit of 1 s"):
        require_success(result)
    assert program_processes(token) == []


def test_a_program_ignoring_sigterm_with_hung_and_stopped_children_is_killed(
        image: Path, sync: Path) -> None:
    token = secrets.token_hex(8)
    result = run_sandboxed(with_sync(spec(image, "stubborn", token, timeout=3), sync),
                           echo=False)
    assert (sync / "ready.json").exists(), "the probe had not forked its children yet"
    assert result.timed_out
    with pytest.raises(ProgramFailedError, match=r"time limit of 3 s"):
        require_success(result)
    assert program_processes(token) == [], "a process of the program outlived the run"


RUNTIME = """
import sys
from pathlib import Path
from tdapp.runtime.sandbox import Mount, SandboxSpec, run_sandboxed
image, sync, token = sys.argv[1:4]
run_sandboxed(SandboxSpec(root=Path(image), argv=["/usr/bin/python3", "-I", "/srv/probe.py",
                                                 "immortal", token],
                          env={}, cwd="/", mounts=[Mount(Path(sync), "/sync", True)],
                          host_paths=sys.argv[4:], timeout=600), echo=False)
"""


def test_a_dapp_clearing_its_death_signal_dies_with_a_killed_runtime(
        image: Path, sync: Path) -> None:
    token = secrets.token_hex(8)
    runtime = subprocess.Popen([sys.executable, "-c", RUNTIME, str(image), str(sync), token,
                                *HOST_PATHS], stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not (sync / "ready.json").exists():
            assert runtime.poll() is None and time.monotonic() < deadline, "no probe started"
            time.sleep(0.01)
        assert program_processes(token) != []
    finally:
        runtime.kill()
        runtime.wait()
    deadline = time.monotonic() + 30
    while (left := program_processes(token)) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in left:  # leave nothing behind whatever the outcome
        os.kill(pid, signal.SIGKILL)
    assert left == [], "the program outlived the runtime that ran it"


# --------------------------------------------------------------- tmpfs size


def shmem() -> int:
    """Bytes of shared memory (every tmpfs) on the host."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("Shmem:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no Shmem in /proc/meminfo")


def test_filling_tmp_and_dev_shm_stops_at_the_size_limit(image: Path, sync: Path) -> None:
    limit, attempt = 8 * MIB, 256 * MIB
    before = shmem()
    live = Live(with_sync(spec(image, "fill", str(attempt), tmp_size=limit), sync), sync)
    try:
        info = live.wait_ready()
        grown = shmem() - before
        program = [p.pid for p in host_processes() if p.pidns == info["pidns"]]
        host_view = os.statvfs(f"/proc/{program[0]}/root/tmp")
    finally:
        require_success(live.release())
    for written, error in (info["tmp"], info["shm"]):
        assert written <= limit and error == errno.errorcode[errno.ENOSPC]
    assert (host_view.f_blocks - host_view.f_bfree) * host_view.f_frsize <= limit
    assert grown < 4 * limit + 64 * MIB, f"the host's shared memory grew by {grown} bytes"


def test_tmp_size_defaults_to_the_memory_limit(image: Path) -> None:
    result = run_sandboxed(spec(image, "tmp-size", memory_limit=384 * MIB), echo=False)
    require_success(result)
    assert int(result.stdout_tail) == 384 * MIB


def test_the_dapp_cannot_mount_a_tmpfs_of_its_own(image: Path) -> None:
    seen = output(run_sandboxed(spec(image, "own-tmpfs", str(64 * MIB), tmp_size=8 * MIB),
                                echo=False))
    assert seen["unshare"] != "ok", f"the program made a user namespace: {seen}"
    assert seen.get("filled") is None

"""The runtime's sandbox, with real bubblewrap and a small C probe program."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from tdapp.errors import InputError, ProgramFailedError
from tdapp.runtime.sandbox import (
    Mount,
    SandboxResult,
    SandboxSpec,
    default_host_paths_for,
    require_success,
    run_sandboxed,
)

pytestmark = [
    pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap (bwrap) is not installed"),
    pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is needed to build the probe"),
]

PROBE_C = r"""
#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
extern char **environ;
int main(int argc, char **argv) {
    const char *m = argc > 1 ? argv[1] : "";
    if (!strcmp(m, "env")) { for (char **e = environ; *e; e++) puts(*e); return 0; }
    if (!strcmp(m, "cwd")) { char b[4096]; puts(getcwd(b, sizeof b)); return 0; }
    if (!strcmp(m, "host")) { char b[256]; gethostname(b, sizeof b); puts(b); return 0; }
    if (!strcmp(m, "ls")) {
        DIR *d = opendir(argv[2]);
        if (!d) { printf("NODIR %s\n", strerror(errno)); return 1; }
        struct dirent *e; while ((e = readdir(d))) printf("%s\n", e->d_name);
        return 0;
    }
    if (!strcmp(m, "read")) {
        int fd = open(argv[2], O_RDONLY);
        if (fd < 0) { printf("NOREAD %s\n", strerror(errno)); return 1; }
        char b[4096]; ssize_t n = read(fd, b, sizeof b); fwrite(b, 1, n > 0 ? n : 0, stdout);
        return 0;
    }
    if (!strcmp(m, "write")) {
        int fd = open(argv[2], O_WRONLY | O_CREAT | O_TRUNC, 0644);
        if (fd < 0) { printf("NOWRITE %s\n", strerror(errno)); return 1; }
        write(fd, argv[3], strlen(argv[3])); close(fd); puts("WROTE"); return 0;
    }
    if (!strcmp(m, "connect")) {
        int s = socket(AF_INET, SOCK_STREAM, 0);
        if (s < 0) { printf("NOSOCKET %s\n", strerror(errno)); return 1; }
        struct sockaddr_in a = {0}; a.sin_family = AF_INET; a.sin_port = htons(atoi(argv[3]));
        inet_pton(AF_INET, argv[2], &a.sin_addr);
        if (connect(s, (struct sockaddr *)&a, sizeof a) < 0) {
            printf("NOCONNECT %s\n", strerror(errno)); return 1;
        }
        puts("CONNECTED"); return 0;
    }
    if (!strcmp(m, "fail")) {
        for (int i = 0; i < 30; i++) fprintf(stderr, "line %d\n", i);
        fprintf(stderr, "boom: bad input\n"); return 3;
    }
    /* pid 1 of its sandbox ignores raise(SIGKILL), as any init; a fault still ends it */
    if (!strcmp(m, "crash")) { fflush(stdout); *(volatile int *)0 = 1; return 0; }
    if (!strcmp(m, "mem")) {
        size_t n = (size_t)atoi(argv[2]) << 20; char *p = malloc(n);
        if (!p) { fprintf(stderr, "malloc failed\n"); return 12; }
        for (size_t i = 0; i < n; i += 4096) p[i] = 1;
        puts("TOUCHED"); return 0;
    }
    if (!strcmp(m, "sleep")) { sleep(atoi(argv[2])); return 0; }
    puts("hello"); return 0;
}
"""


@pytest.fixture(scope="module")
def probe_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("probe")
    src = d / "probe.c"
    src.write_text(PROBE_C)
    return src


def _compile(src: Path, out: Path, *, static: bool) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = ["gcc", "-O1", "-w", "-o", str(out), str(src)]
    if static:
        cmd.insert(1, "-static")
    subprocess.run(cmd, check=True)


@pytest.fixture(scope="module")
def static_root(tmp_path_factory: pytest.TempPathFactory, probe_src: Path) -> Path:
    root = tmp_path_factory.mktemp("image") / "rootfs"
    _compile(probe_src, root / "bin" / "probe", static=True)
    (root / "data").mkdir()
    (root / "data" / "readme.txt").write_text("from the image\n")
    return root


@pytest.fixture
def volumes(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    out.mkdir()
    (inp / "a.txt").write_text("input A\n")
    yield inp, out


def spec_for(root: Path, *args: str, **kw: object) -> SandboxSpec:
    base = SandboxSpec(root=root, argv=["/bin/probe", *args], env={"PATH": "/bin"},
                       cwd="/", mounts=[])
    return replace(base, **kw)  # type: ignore[arg-type]


def run(root: Path, *args: str, **kw: object) -> SandboxResult:
    return run_sandboxed(spec_for(root, *args, **kw))


def test_runs_static_program_and_output_goes_to_stderr(
    static_root: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    result = run(static_root)
    assert result == SandboxResult(0, None, "hello\n", "")
    require_success(result)
    out, err = capfd.readouterr()
    assert out == ""
    assert "hello" in err


def test_env_is_exactly_spec_env(static_root: Path) -> None:
    os.environ["TDAPP_SANDBOX_LEAK"] = "host-secret"
    try:
        result = run(static_root, "env", env={"PATH": "/bin", "FOO": "bar baz"}, cwd="/data")
    finally:
        del os.environ["TDAPP_SANDBOX_LEAK"]
    # bubblewrap always sets PWD to the working folder (documented)
    assert sorted(result.stdout_tail.splitlines()) == ["FOO=bar baz", "PATH=/bin", "PWD=/data"]


def test_cwd_and_hostname(static_root: Path) -> None:
    assert run(static_root, "cwd", cwd="/data").stdout_tail == "/data\n"
    assert run(static_root, "host").stdout_tail == "tdapp\n"


def test_relative_argv0_is_looked_up_in_the_image(static_root: Path) -> None:
    result = run_sandboxed(replace(spec_for(static_root), argv=["probe", "cwd"]))
    assert result.stdout_tail == "/\n"
    with pytest.raises(InputError, match="not in the image"):
        run_sandboxed(replace(spec_for(static_root), argv=["nosuch"]))


def test_volumes_visible_and_writable_only_when_writable(
    static_root: Path, volumes: tuple[Path, Path]
) -> None:
    inp, out = volumes
    mounts = [Mount(inp, "/encryptedInputs", False), Mount(out, "/encryptedOutputs", True)]
    assert "a.txt" in run(static_root, "ls", "/encryptedInputs", mounts=mounts).stdout_tail
    assert run(static_root, "read", "/encryptedInputs/a.txt", mounts=mounts).stdout_tail == (
        "input A\n"
    )
    res = run(static_root, "write", "/encryptedOutputs/r.txt", "result", mounts=mounts)
    assert res.exit_code == 0
    assert (out / "r.txt").read_text() == "result"
    res = run(static_root, "write", "/encryptedInputs/x", "no", mounts=mounts)
    assert res.exit_code == 1
    assert "Read-only" in res.stdout_tail
    assert not (inp / "x").exists()


def test_root_and_image_are_read_only_tmp_is_writable(static_root: Path) -> None:
    for path in ("/new", "/data/new", "/bin/new"):
        res = run(static_root, "write", path, "x")
        assert res.exit_code == 1, path
        assert "NOWRITE" in res.stdout_tail
    assert run(static_root, "write", "/tmp/ok", "x").exit_code == 0
    assert not (static_root / "data" / "new").exists()


def test_host_home_and_secrets_are_invisible(static_root: Path) -> None:
    home = os.environ.get("HOME", "/root")
    for path in ("/root", home, "/home", "/etc", "/work"):
        res = run(static_root, "ls", path)
        assert res.exit_code == 1 and "NODIR" in res.stdout_tail, path
    res = run(static_root, "read", "/etc/shadow")
    assert res.exit_code == 1 and "No such file" in res.stdout_tail
    listing = set(run(static_root, "ls", "/").stdout_tail.split())
    assert listing <= {".", "..", "bin", "data", "proc", "dev", "tmp"}


@pytest.fixture
def tcp_server() -> Iterator[int]:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    srv.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
                conn.close()
            except OSError:
                pass

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield srv.getsockname()[1]
    stop.set()
    t.join()
    srv.close()


def test_no_network(static_root: Path, tcp_server: int) -> None:
    # sanity: the host itself can connect
    socket.create_connection(("127.0.0.1", tcp_server), timeout=2).close()
    res = run(static_root, "connect", "127.0.0.1", str(tcp_server))
    assert res.exit_code == 1 and "NOCONNECT" in res.stdout_tail
    res = run(static_root, "connect", "1.1.1.1", "53", timeout=10)
    assert res.exit_code == 1 and "NOCONNECT" in res.stdout_tail
    assert "unreachable" in res.stdout_tail.lower()


def test_network_shared_when_allowed(static_root: Path, tcp_server: int) -> None:
    res = run(static_root, "connect", "127.0.0.1", str(tcp_server), network=True)
    assert res.stdout_tail == "CONNECTED\n"


def test_nonzero_exit_reported_with_stderr_tail(static_root: Path) -> None:
    res = run(static_root, "fail")
    assert (res.exit_code, res.signal) == (3, None)
    with pytest.raises(ProgramFailedError) as info:
        require_success(res)
    msg = str(info.value)
    assert msg.startswith("the program exited with status 3: ")
    assert msg.endswith("boom: bad input")
    assert "line 21" in msg and "line 20" not in msg  # last 10 lines only
    assert "\n" not in msg


def test_killed_by_signal(static_root: Path) -> None:
    res = run(static_root, "crash")
    assert res.signal == 11
    with pytest.raises(ProgramFailedError, match=r"killed by signal 11 \(SIGSEGV\)"):
        require_success(res)


def test_memory_limit(static_root: Path) -> None:
    res = run(static_root, "mem", "512", memory_limit=64 << 20)
    assert res.exit_code != 0
    assert "TOUCHED" not in res.stdout_tail
    with pytest.raises(ProgramFailedError):
        require_success(res)
    ok = run(static_root, "mem", "16", memory_limit=64 << 20, stack_limit=8 << 20)
    assert ok.stdout_tail == "TOUCHED\n"


def test_injected_file_is_read_only(static_root: Path) -> None:
    files = {"/etc/tdapp/config.json": b'{"k": 1}', "/data/extra.txt": b"extra"}
    with pytest.raises(InputError, match="read-only"):
        run(static_root, "read", "/data/extra.txt", files=files)
    files = {"/etc/tdapp/config.json": b'{"k": 1}'}
    assert run(static_root, "read", "/etc/tdapp/config.json", files=files).stdout_tail == (
        '{"k": 1}'
    )
    res = run(static_root, "write", "/etc/tdapp/config.json", "x", files=files)
    assert res.exit_code == 1 and "NOWRITE" in res.stdout_tail


def test_timeout_kills_sleeping_program(static_root: Path) -> None:
    start = time.monotonic()
    res = run(static_root, "sleep", "30", timeout=0.5)
    assert time.monotonic() - start < 5
    assert res.timed_out and res.signal == 9
    with pytest.raises(ProgramFailedError, match="time limit"):
        require_success(res)


def test_bad_specs_are_refused(static_root: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="absolute"):
        run(static_root, cwd="data")
    with pytest.raises(InputError, match="does not exist"):
        run(static_root, mounts=[Mount(tmp_path / "missing", "/in", False)])
    with pytest.raises(InputError, match=r"'\.\.'"):
        run(static_root, mounts=[Mount(tmp_path, "/in/../etc", False)])
    with pytest.raises(InputError, match="does not exist on this host"):
        run(static_root, host_paths=["/no/such/host/path"])
    with pytest.raises(InputError, match="not a folder"):
        run(tmp_path / "nope")


def test_dynamic_program_uses_host_libc(tmp_path: Path, probe_src: Path) -> None:
    root = tmp_path / "rootfs"
    _compile(probe_src, root / "app" / "probe", static=False)
    host_paths = default_host_paths_for(root)
    assert host_paths and all(os.path.exists(p) for p in host_paths)
    assert any(p.endswith("lib") for p in host_paths)
    res = run_sandboxed(SandboxSpec(root=root, argv=["/app/probe"], env={}, cwd="/",
                                    mounts=[], host_paths=host_paths))
    assert res.stdout_tail == "hello\n"


def test_default_host_paths_empty_for_static_or_own_libc(static_root: Path, tmp_path: Path) -> None:
    assert default_host_paths_for(static_root) == []
    root = tmp_path / "r"
    (root / "lib").mkdir(parents=True)
    shutil.copy("/bin/true", root / "true")
    assert default_host_paths_for(root) != []
    (root / "lib" / "libc.so.6").write_bytes(b"")
    assert default_host_paths_for(root) == []


def test_host_python_via_host_paths(tmp_path: Path) -> None:
    py = "/usr/bin/python3"
    if not os.path.exists(py):
        pytest.skip("no /usr/bin/python3 on this host")
    root = tmp_path / "rootfs"
    (root / "srv").mkdir(parents=True)
    (root / "srv" / "main.py").write_text(
        "import os\n"
        # LC_CTYPE is added by Python itself (PEP 538 locale coercion), not by the host
        "print(sorted(set(os.environ) - {'LC_CTYPE'}), os.getcwd())\n"
        "print(os.path.exists(os.path.expanduser('~')) and os.path.expanduser('~') != '/')\n"
    )
    host = ["/usr/bin/python3*", "/usr/lib", *[p for p in ("/lib", "/lib64") if os.path.exists(p)]]
    res = run_sandboxed(SandboxSpec(root=root, argv=["python3", "main.py"],
                                    env={"PATH": "/usr/bin", "HOME": "/root"}, cwd="/srv",
                                    mounts=[], host_paths=host))
    require_success(res)
    assert res.stdout_tail.splitlines() == ["['HOME', 'PATH', 'PWD'] /srv", "False"]


def test_limits_are_applied_to_the_program(static_root: Path) -> None:
    res = run(static_root, "mem", "512", memory_limit=64 << 20)
    assert (res.exit_code, res.stderr_tail) == (12, "malloc failed\n")
    limits = run(static_root, "read", "/proc/self/limits",
                 memory_limit=100 << 20, stack_limit=4 << 20).stdout_tail
    lines = {ln[:26].strip(): ln[26:].split()[:2] for ln in limits.splitlines()[1:]}
    assert lines["Max address space"] == [str(100 << 20)] * 2
    assert lines["Max stack size"] == [str(4 << 20)] * 2


def test_missing_bwrap_is_unavailable(static_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tdapp.errors import UnavailableError

    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(UnavailableError, match="bubblewrap"):
        run(static_root)

"""Run a program inside a bubblewrap sandbox (DESIGN.md, "The runtime's sandbox").

:func:`run_sandboxed` runs ``spec.argv`` under ``bwrap`` and returns how it ended;
:func:`require_success` turns a failure into :class:`~tdapp.errors.ProgramFailedError`.

How the sandbox is built (in this order, bubblewrap applies its options in order):

- ``--unshare-all`` (user, pid, ipc, uts, cgroup and net namespaces; ``--share-net``
  only when ``spec.network`` is true, otherwise the program has just a down
  loopback), ``--die-with-parent``, ``--new-session``, ``--hostname tdapp``.
- ``--clearenv`` then ``--setenv`` for each of ``spec.env``; nothing comes from the
  host. bubblewrap always sets ``PWD`` to the working folder after ``--chdir``
  (it cannot be unset), so the program sees exactly ``spec.env`` plus ``PWD=cwd``.
- The root is a fresh tmpfs (``--tmpfs /``, bubblewrap needs a writable root to
  create mount points); every top-level entry of the image's rootfs is bound
  read-only at ``/<entry>`` (symlinks are recreated as symlinks; the image's
  ``proc``, ``dev`` and ``tmp`` are replaced by ``--proc /proc``, ``--dev /dev``
  and a private ``--tmpfs /tmp``). Then, parents before children: the host
  paths (globs expanded on the host, bound read-only at the same place), the
  volumes (``--bind`` or ``--ro-bind`` of caller-prepared plaintext folders that
  live on tmpfs) and the injected files (``--ro-bind-data`` from a pipe, so their
  content only ever exists in memory). Last, ``--remount-ro /`` makes the tmpfs
  root itself read-only: the program can write only to ``/tmp`` and writable
  volumes. The host's home, ``/etc`` and everything else are not there.
  A mount point that would have to be created inside a read-only image folder
  is refused up front with :class:`~tdapp.errors.InputError`.
- ``argv[0]`` is resolved as the sandbox will see it: a bare name is looked up
  in ``spec.env["PATH"]`` (default ``/usr/local/bin:/usr/bin:/bin``) inside the
  image, the host paths and the volumes; a relative path is taken from ``cwd``.

Limits: bubblewrap has no rlimit option, so ``memory_limit`` (``RLIMIT_AS``,
soft and hard) and ``stack_limit`` (``RLIMIT_STACK``) are set by a tiny Python
launcher (``python -I -S -c …``) that calls ``setrlimit`` and then ``exec``s
bwrap; the limits are inherited by bwrap and the program across ``exec`` and,
since bubblewrap drops all capabilities, the program cannot raise them. This
avoids ``preexec_fn`` (unsafe with threads) and any dependency on ``prlimit``.
``RLIMIT_AS`` counts address space, not resident memory: a program that maps
much more than it touches needs a larger limit. ``timeout`` kills bwrap's whole
process group with SIGKILL; ``--die-with-parent`` and the pid namespace take the
program and all its children down with it.

Exit status: bubblewrap reports a program killed by signal N as status 128+N
(like a shell), so statuses 129…192 are reported as ``signal=N``. A failure of
bubblewrap's own setup (status 1 with only a ``bwrap: …`` line on stderr) raises
:class:`~tdapp.errors.InputError` rather than being blamed on the program.

Output: the program's stdout *and* stderr are copied to the runtime's stderr
(the runtime's stdout is reserved for its result); the last 64 KiB of each are
kept in the result for messages.

Host libc trade-off: a dynamically linked ELF program needs a loader and libc.
When the image has none, :func:`default_host_paths_for` returns the host's
library folders to bind read-only. Those host files are **not** part of the
image's measurement: an image relying on them trusts the host's libc. Build
programs statically (or ship their libraries in the image) to avoid that.
"""

from __future__ import annotations

import contextlib
import glob
import os
import posixpath
import re
import shutil
import signal
import struct
import subprocess
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from tdapp.builder.paths import resolve_in_image
from tdapp.errors import InputError, ProgramFailedError, UnavailableError

__all__ = [
    "Mount",
    "SandboxResult",
    "SandboxSpec",
    "default_host_paths_for",
    "require_success",
    "run_sandboxed",
]

TAIL_BYTES = 64 * 1024
"""How much of the end of stdout and stderr a :class:`SandboxResult` keeps."""

DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
_TMP = "/tmp"  # noqa: S108 - the sandbox's own private tmpfs, not the host's
_REPLACED_ENTRIES = frozenset({"proc", "dev", "tmp"})
_ENV_NAME = re.compile(r"^[^=\x00]+$")
_LAUNCHER = (
    "import os,resource,sys\n"
    "for r,v in ((resource.RLIMIT_AS,int(sys.argv[1])),(resource.RLIMIT_STACK,int(sys.argv[2]))):\n"
    "    if v>=0: resource.setrlimit(r,(v,v))\n"
    "os.execv(sys.argv[3],sys.argv[3:])\n"
)


@dataclass(frozen=True)
class Mount:
    """A volume: a host folder (plaintext, on tmpfs) bound at ``target``."""

    source: Path
    target: str
    writable: bool


@dataclass(frozen=True)
class SandboxSpec:
    """Everything :func:`run_sandboxed` needs; see the module docstring."""

    root: Path
    argv: list[str]
    env: dict[str, str]
    cwd: str
    mounts: list[Mount]
    host_paths: list[str] = field(default_factory=list)
    files: dict[str, bytes] = field(default_factory=dict)
    memory_limit: int | None = None
    stack_limit: int | None = None
    network: bool = False
    timeout: float | None = None
    user: tuple[int, int] | None = None
    """(uid, gid) the program runs as inside its user namespace; None keeps the caller's."""


@dataclass(frozen=True)
class SandboxResult:
    """How the program ended. ``signal`` is set if it was killed by one."""

    exit_code: int
    signal: int | None
    stdout_tail: str
    stderr_tail: str
    timed_out: bool = False


# --------------------------------------------------------------------- checks


def _check_abs(path: str, what: str, *, allow_root: bool = False) -> str:
    if not path.startswith("/") or "\x00" in path:
        raise InputError(f"{what} {path!r} must be an absolute path")
    parts = path.split("/")
    if ".." in parts or "." in parts:
        raise InputError(f"{what} {path!r} must not contain '.' or '..'")
    norm = posixpath.normpath(path)
    if norm.startswith("//"):
        norm = "/" + norm.lstrip("/")
    if norm == "/" and not allow_root:
        raise InputError(f"{what} cannot be '/'")
    return norm


def _image_entries(root: Path) -> list[Path]:
    if not root.is_dir():
        raise InputError(f"image root {root} is not a folder")
    return sorted(e for e in root.iterdir() if e.name not in _REPLACED_ENTRIES)


def _check_mount_point(root: Path, entries: set[str], target: str, what: str) -> None:
    """Refuse a mount point bubblewrap would have to create in a read-only image folder."""
    top = target.lstrip("/").split("/", 1)[0]
    if top not in entries or "/" not in target.lstrip("/"):
        return
    inside = root / target.lstrip("/")
    if not os.path.lexists(inside):
        raise InputError(
            f"cannot place {what} at {target}: the image's /{top} is read-only and has no "
            f"{target}; create it in the image or choose another path"
        )


def _expand_host_paths(patterns: list[str]) -> list[str]:
    found: list[str] = []
    for pattern in patterns:
        _check_abs(pattern, "host path")
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else (
            [pattern] if os.path.lexists(pattern) else []
        )
        if not matches:
            raise InputError(f"host path {pattern} does not exist on this host")
        found.extend(posixpath.normpath(m) for m in matches)
    return list(dict.fromkeys(found))


def _visible(path: str, root: Path, host: list[str], mounts: list[Mount]) -> bool:
    """Whether ``path`` will exist in the sandbox (approximately: links are followed inside
    the image only, not into host paths or volumes)."""
    if resolve_in_image(root, path) is not None:
        return True
    for h in host:
        if (path == h or path.startswith(h.rstrip("/") + "/")) and os.path.lexists(path):
            return True
    for m in mounts:
        t = m.target.rstrip("/")
        if path.startswith(t + "/") and os.path.lexists(m.source / path[len(t) + 1 :]):
            return True
    return False


def _resolve_argv0(spec: SandboxSpec, host: list[str]) -> str:
    if not spec.argv or not spec.argv[0]:
        raise InputError("the program's command is empty")
    a0 = spec.argv[0]
    if "/" in a0:
        full = posixpath.normpath(posixpath.join(spec.cwd, a0))
        if not _visible(full, spec.root, host, spec.mounts):
            raise InputError(f"the program {a0} does not exist in the image")
        return full
    search = spec.env.get("PATH", DEFAULT_PATH)
    for d in search.split(":"):
        if d.startswith("/"):
            cand = posixpath.join(d, a0)
            if _visible(cand, spec.root, host, spec.mounts):
                return cand
    raise InputError(f"the program {a0!r} is not in the image (searched PATH={search})")


# -------------------------------------------------------------------- command


def _bwrap() -> str:
    path = shutil.which("bwrap")
    if path is None:
        raise UnavailableError(
            "bubblewrap (bwrap) is not installed; install the 'bubblewrap' package to run programs"
        )
    return path


def _build_args(spec: SandboxSpec, bwrap: str) -> tuple[list[str], list[tuple[str, bytes]]]:
    """The bwrap command line; injected files are returned as (target, content) and
    referenced in the command as ``{fd:N}`` placeholders, N being their index."""
    cwd = _check_abs(spec.cwd, "working folder", allow_root=True)
    for name, value in spec.env.items():
        if not _ENV_NAME.match(name) or "\x00" in value:
            raise InputError(f"bad environment variable name or value: {name!r}")
    for limit, what in ((spec.memory_limit, "memory limit"), (spec.stack_limit, "stack limit")):
        if limit is not None and limit <= 0:
            raise InputError(f"the {what} must be positive, got {limit}")
    if spec.timeout is not None and spec.timeout <= 0:
        raise InputError(f"the timeout must be positive, got {spec.timeout}")

    entries = _image_entries(spec.root)
    entry_names = {e.name for e in entries}
    host = _expand_host_paths(spec.host_paths)
    argv0 = _resolve_argv0(spec, host)

    args = [bwrap, "--unshare-all"]
    if spec.user is not None:
        uid, gid = spec.user
        args += ["--unshare-user", "--uid", str(uid), "--gid", str(gid)]
    if spec.network:
        args.append("--share-net")
    args += ["--die-with-parent", "--new-session", "--hostname", "tdapp", "--clearenv"]
    for name, value in spec.env.items():
        args += ["--setenv", name, value]
    args += ["--tmpfs", "/"]
    for entry in entries:
        if entry.is_symlink():
            args += ["--symlink", os.readlink(entry), f"/{entry.name}"]
        else:
            args += ["--ro-bind", str(entry), f"/{entry.name}"]
    args += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", _TMP]

    placed: list[tuple[str, list[str]]] = []
    targets: dict[str, str] = {}

    def place(target: str, what: str, op: list[str]) -> None:
        if target in targets:
            raise InputError(f"{what} and {targets[target]} are both placed at {target}")
        if target in ("/proc", "/dev", _TMP):
            raise InputError(f"{what} cannot be placed at {target}")
        targets[target] = what
        _check_mount_point(spec.root, entry_names, target, what)
        placed.append((target, op))

    for h in host:
        place(h, f"host path {h}", ["--ro-bind", h, h])
    for m in spec.mounts:
        target = _check_abs(m.target, "volume path")
        if not m.source.is_dir():
            raise InputError(f"volume folder {m.source} for {target} does not exist")
        place(target, f"volume {target}", ["--bind" if m.writable else "--ro-bind",
                                           str(m.source), target])
    files: list[tuple[str, bytes]] = []
    for i, (path, content) in enumerate(spec.files.items()):
        target = _check_abs(path, "injected file")
        files.append((target, bytes(content)))
        place(target, f"injected file {target}", ["--ro-bind-data", f"{{fd:{i}}}", target])
    placed.sort(key=lambda p: (p[0].count("/"), p[0]))
    for _, op in placed:
        args += op
    args += ["--remount-ro", "/", "--chdir", cwd, "--", argv0, *spec.argv[1:]]
    return args, files


# ------------------------------------------------------------------------ run


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


def _default_echo() -> BinaryIO | None:
    buf = getattr(sys.stderr, "buffer", None)
    return buf if buf is not None else None


def run_sandboxed(spec: SandboxSpec, *, echo: bool = True) -> SandboxResult:
    """Run ``spec.argv`` in the sandbox and return how it ended.

    Never raises for the program's own failure (see :func:`require_success`).
    Raises :class:`UnavailableError` if bubblewrap is missing and
    :class:`InputError` if the spec is unusable or the sandbox cannot be set up.
    With ``echo`` the program's output is copied to this process's stderr.
    """
    bwrap = _bwrap()
    args, files = _build_args(spec, bwrap)

    pipes: list[tuple[int, int]] = [os.pipe() for _ in files]
    try:
        for i, (r, _) in enumerate(pipes):
            args[args.index(f"{{fd:{i}}}")] = str(r)
        cmd = args
        if spec.memory_limit is not None or spec.stack_limit is not None:
            cmd = [sys.executable, "-I", "-S", "-c", _LAUNCHER,
                   str(spec.memory_limit if spec.memory_limit is not None else -1),
                   str(spec.stack_limit if spec.stack_limit is not None else -1), *args]
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        try:
            proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=out_w, stderr=err_w,
                pass_fds=[r for r, _ in pipes], start_new_session=True, close_fds=True,
            )
        except OSError as exc:
            for fd in (out_r, err_r):
                os.close(fd)
            raise UnavailableError(f"cannot start bubblewrap: {exc.strerror}") from exc
        finally:
            os.close(out_w)
            os.close(err_w)
    finally:
        for r, _ in pipes:
            os.close(r)
    feeders = [threading.Thread(target=_feed, args=(w, data), daemon=True)
               for (_, w), (_, data) in zip(pipes, files, strict=True)]
    for t in feeders:
        t.start()
    lock = threading.Lock()
    stream = _default_echo() if echo else None
    pumps = [_Pump(out_r, stream, lock), _Pump(err_r, stream, lock)]
    for p in pumps:
        p.start()

    timed_out = False
    try:
        proc.wait(timeout=spec.timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    for p in pumps:
        p.join(timeout=5)
    for t in feeders:
        t.join(timeout=1)

    stdout, stderr = pumps[0].text(), pumps[1].text()
    rc = proc.returncode
    if timed_out:
        return SandboxResult(128 + signal.SIGKILL, signal.SIGKILL, stdout, stderr, True)
    if rc < 0:
        return SandboxResult(128 - rc, -rc, stdout, stderr)
    lines = stderr.strip().splitlines()
    if rc == 1 and len(lines) == 1 and lines[0].startswith("bwrap: ") and not stdout:
        raise InputError(f"the sandbox could not be set up: {lines[0][len('bwrap: '):]}")
    if 128 < rc <= 128 + 64:
        return SandboxResult(rc, rc - 128, stdout, stderr)
    return SandboxResult(rc, None, stdout, stderr)


def _signal_name(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


def require_success(result: SandboxResult) -> None:
    """Raise :class:`ProgramFailedError` unless the program exited with status 0."""
    if result.timed_out:
        msg = "the program ran past its time limit and was killed"
    elif result.signal is not None:
        msg = f"the program was killed by signal {result.signal} ({_signal_name(result.signal)})"
    elif result.exit_code != 0:
        msg = f"the program exited with status {result.exit_code}"
    else:
        return
    lines = [ln.strip() for ln in result.stderr_tail.splitlines() if ln.strip()][-10:]
    if lines:
        tail = " | ".join(lines)
        if len(tail) > 800:
            tail = "…" + tail[-800:]
        msg += f": {tail}"
    raise ProgramFailedError(msg)


# ------------------------------------------------------------------ host libc

_HOST_LIB_DIRS = ("/lib", "/lib64", "/usr/lib", "/usr/lib64")
_OWN_LIBC = re.compile(r"^(libc\.so(\..*)?|libc\.musl.*|ld-linux.*\.so.*|ld-musl.*\.so.*)$")
_PT_INTERP = 3


def _is_dynamic_elf(path: Path) -> bool:
    """Whether ``path`` is an ELF file with a program interpreter (dynamically linked)."""
    try:
        with path.open("rb") as f:
            head = f.read(64)
            if len(head) < 52 or head[:4] != b"\x7fELF":
                return False
            is64, endian = head[4] == 2, "<" if head[5] == 1 else ">"
            if is64:
                phoff, = struct.unpack_from(endian + "Q", head, 32)
                phentsize, phnum = struct.unpack_from(endian + "HH", head, 54)
            else:
                phoff, = struct.unpack_from(endian + "I", head, 28)
                phentsize, phnum = struct.unpack_from(endian + "HH", head, 42)
            if phentsize < 4 or phnum > 4096:
                return False
            f.seek(phoff)
            table = f.read(phentsize * phnum)
    except OSError:
        return False
    for i in range(len(table) // phentsize):
        (p_type,) = struct.unpack_from(endian + "I", table, i * phentsize)
        if p_type == _PT_INTERP:
            return True
    return False


def default_host_paths_for(root: Path, host_paths: Sequence[str] = ()) -> list[str]:
    """The host library folders a dynamically linked ELF program of this image needs.

    Empty if the image has no dynamically linked ELF file or ships its own libc or
    loader. A host program the image names (an interpreter) is dynamically linked
    against the host's libc, so it brings the same folders. These host files are
    not measured (see the module docstring).
    """
    dynamic = any(_is_dynamic_elf(Path(p)) for pattern in host_paths
                  for p in glob.glob(pattern) if Path(p).is_file())
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            if _OWN_LIBC.match(name):
                return []
            p = Path(dirpath) / name
            if not dynamic and not p.is_symlink() and p.is_file() and _is_dynamic_elf(p):
                dynamic = True
    if not dynamic:
        return []
    return [d for d in _HOST_LIB_DIRS if os.path.exists(d)]

"""Run a program inside a bubblewrap sandbox (docs/runtime.md, "Run").

:func:`run_sandboxed` runs ``spec.argv`` under ``bwrap`` and returns how it ended;
:func:`require_success` turns a failure into :class:`~tdapp.errors.ProgramFailedError`.
This module owns what the sandbox is made of (:mod:`tdapp.runtime.bwrap` starts
it and sees the program to its end); it must never put a secret (an environment
value, an injected file, a host path) on a command line or in an environment
outside the sandbox, and never leave a process of the program running after it
returns.

How the sandbox is built (in this order, bubblewrap applies its options in order):

- ``--unshare-all`` (user, pid, ipc, uts, cgroup and net namespaces; ``--share-net``
  only when ``spec.network`` is true, otherwise the program has just a down
  loopback), ``--unshare-user --disable-userns`` (the program can make no user
  namespace of its own, so it can mount nothing, not even an unbounded tmpfs),
  ``--as-pid-1``, ``--die-with-parent``, ``--new-session``, ``--hostname tdapp``.
- ``--as-pid-1``: the program is pid 1 of its pid namespace and no process of the
  runtime's making (no bubblewrap monitor) lives there, so ``/proc`` shows only
  the program's own processes and there is nothing to read or ptrace. Like any
  init it ignores the signals it sends itself without a handler installed
  (``raise(SIGKILL)``, ``kill(0, SIGTERM)``); faults (SIGSEGV, SIGBUS, …) and the
  kernel's OOM kill still end it, and it inherits its orphaned children.
- ``--clearenv`` then ``--setenv`` for each of ``spec.env``; nothing comes from the
  host. bubblewrap always sets ``PWD`` to the working folder after ``--chdir``
  (it cannot be unset), so the program sees exactly ``spec.env`` plus ``PWD=cwd``.
- The root is a fresh tmpfs (``--tmpfs /``, bubblewrap needs a writable root to
  create mount points); every top-level entry of the image's rootfs is bound
  read-only at ``/<entry>`` (symlinks are recreated as symlinks; the image's
  ``proc``, ``dev`` and ``tmp`` are replaced by ``--proc /proc``, ``--dev /dev``
  and a private ``/tmp``). Then, parents before children: the host
  paths (globs expanded on the host, bound read-only at the same place), the
  volumes (``--bind`` or ``--ro-bind`` of caller-prepared plaintext folders that
  live on tmpfs) and the injected files (``--ro-bind-data`` from a pipe, so their
  content only ever exists in memory). Last, ``--remount-ro`` of ``/dev`` and of
  ``/`` makes both read-only: the program can write only to ``/tmp``,
  ``/dev/shm`` and writable volumes. The host's home, ``/etc`` and everything
  else are not there. A mount point that would have to be created inside a
  read-only image folder is refused up front with :class:`~tdapp.errors.InputError`.
- ``/tmp`` and ``/dev/shm`` are each a private tmpfs of ``tmp_size`` bytes
  (``--size``), so a program that fills them gets ENOSPC instead of the host's
  memory. When ``spec.tmp_size`` is None it is ``spec.memory_limit`` (the program
  may keep in files as much as it may hold in memory), or
  :data:`DEFAULT_TMP_SIZE` when there is no memory limit either. Not bounded
  by it: ``memfd_create`` files and System V shared memory (only ``RLIMIT_AS``
  limits how much of them is mapped at once); that needs a memory cgroup.
- ``argv[0]`` is resolved as the sandbox will see it: a bare name is looked up
  in ``spec.env["PATH"]`` (default ``/usr/local/bin:/usr/bin:/bin``) inside the
  image, the host paths and the volumes; a relative path is taken from ``cwd``.

What other local users can see: every process's command line is public
(``/proc/PID/cmdline``). bubblewrap is started with an empty environment and
gets all its options over a pipe (``--args FD``), so its command line is
``bwrap --args N -- PROGRAM ARGS…``: the session's command, which the program
shows as its own command line anyway, and nothing else (no environment value,
no injected file, no host path). Secrets belong in the session's environment or
injected files, never in its command. Inside, ``/proc/self/mountinfo`` still
names the host folders that are bound (the image's entries, host paths,
volumes), as every bind mount does. Descriptor numbers in bubblewrap's
options are typed references resolved by position, so no value of the session
is ever rewritten.

Limits: bubblewrap has no rlimit option, so ``memory_limit`` (``RLIMIT_AS``,
soft and hard) and ``stack_limit`` (``RLIMIT_STACK``) are set by a tiny Python
launcher (``python -I -S -c …``, the two numbers its only arguments besides
bwrap's own command line) that calls ``setrlimit`` and then ``exec``s bwrap; the
limits are inherited by bwrap and the program across ``exec`` and, since
bubblewrap drops all capabilities, the program cannot raise them. This avoids
``preexec_fn`` (unsafe with threads) and any dependency on ``prlimit``.
``RLIMIT_AS`` counts address space, not resident memory: a program that maps
much more than it touches needs a larger limit. At ``timeout`` seconds the
program (pid 1 of the sandbox, known from bubblewrap's ``--info-fd`` and held by
a pidfd) gets SIGKILL, which the kernel extends to every process of its pid
namespace whatever they ignore, stop or fork; bwrap's process group gets SIGKILL
too. The result says ``timed_out`` and :func:`require_success` names the limit.

Exit status: bubblewrap reports a program killed by signal N as status 128+N
(like a shell), so statuses 129…192 are reported as ``signal=N``. A failure of
bubblewrap's own setup (status 1 with only a ``bwrap: …`` line on stderr) raises
:class:`~tdapp.errors.InputError` rather than being blamed on the program.

Output: the program's stdout *and* stderr are copied to the runtime's stderr
(the runtime's stdout is reserved for its result); the last 64 KiB of each are
kept in the result for messages.

Host libc trade-off: a dynamically linked ELF program needs a loader and libc.
When the image has none, :func:`default_host_paths_for` (from
:mod:`tdapp.runtime.hostlibs`) returns the host's library folders to bind
read-only. Those host files are **not** part of the image's measurement: an
image relying on them trusts the host's libc. Build programs statically (or
ship their libraries in the image) to avoid that.
"""

from __future__ import annotations

import glob
import math
import os
import posixpath
import re
import signal
from dataclasses import dataclass, field
from pathlib import Path

from tdapp.builder.paths import resolve_in_image
from tdapp.errors import InputError, ProgramFailedError
from tdapp.runtime.bwrap import Descriptor, Fd, Option, find_bwrap, run_bwrap
from tdapp.runtime.hostlibs import default_host_paths_for

__all__ = [
    "Mount",
    "SandboxResult",
    "SandboxSpec",
    "default_host_paths_for",
    "require_success",
    "run_sandboxed",
]

DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
DEFAULT_TMP_SIZE = 64 * 1024 * 1024
"""Bytes of ``/tmp`` (and of ``/dev/shm``) when the spec gives neither a size nor a memory limit."""

_TMP = "/tmp"  # noqa: S108 - the sandbox's own private tmpfs, not the host's
_SHM = "/dev/shm"  # noqa: S108 - the sandbox's own, not the host's
_REPLACED_ENTRIES = frozenset({"proc", "dev", "tmp"})
_ENV_NAME = re.compile(r"^[^=\x00]+$")


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
    file_modes: dict[str, int] = field(default_factory=dict)
    """Permission bits of injected files, by path (the session's ``permission``);
    a file not listed gets bubblewrap's default."""
    memory_limit: int | None = None
    stack_limit: int | None = None
    network: bool = False
    timeout: float | None = None
    """Seconds after which the program and all its processes are killed; None: no limit."""
    user: tuple[int, int] | None = None
    """(uid, gid) the program runs as inside its user namespace; None keeps the caller's."""
    tmp_size: int | None = None
    """Bytes of ``/tmp`` and of ``/dev/shm`` each; None: ``memory_limit`` (module docstring)."""


@dataclass(frozen=True)
class SandboxResult:
    """How the program ended. ``signal`` is set if it was killed by one."""

    exit_code: int
    signal: int | None
    stdout_tail: str
    stderr_tail: str
    timed_out: bool = False
    time_limit: float | None = None
    """The limit in seconds the program ran past, when ``timed_out``."""


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


def tmp_size_of(spec: SandboxSpec) -> int:
    """Bytes of the sandbox's ``/tmp`` and ``/dev/shm`` (module docstring)."""
    if spec.tmp_size is not None:
        return spec.tmp_size
    return spec.memory_limit if spec.memory_limit is not None else DEFAULT_TMP_SIZE


def _check_spec(spec: SandboxSpec) -> None:
    for name, value in spec.env.items():
        if not _ENV_NAME.match(name) or "\x00" in value:
            raise InputError(f"bad environment variable name or value: {name!r}")
    for arg in spec.argv:
        if "\x00" in arg:
            raise InputError("the program's command holds a NUL character")
    for limit, what in ((spec.memory_limit, "memory limit"), (spec.stack_limit, "stack limit"),
                        (spec.tmp_size, "size of /tmp")):
        if limit is not None and limit <= 0:
            raise InputError(f"the {what} must be positive, got {limit}")
    if spec.timeout is not None and not (math.isfinite(spec.timeout) and spec.timeout > 0):
        raise InputError(f"the timeout must be a positive number of seconds, got {spec.timeout}")


def _build_args(spec: SandboxSpec) -> tuple[list[Option], list[str], list[tuple[str, bytes]]]:
    """bwrap's options (given over ``--args``), the program's command line as the sandbox
    sees it, and the injected files as (target, content), referenced by position."""
    cwd = _check_abs(spec.cwd, "working folder", allow_root=True)
    _check_spec(spec)
    entries = _image_entries(spec.root)
    entry_names = {e.name for e in entries}
    host = _expand_host_paths(spec.host_paths)
    argv0 = _resolve_argv0(spec, host)

    args: list[Option] = ["--unshare-all", "--unshare-user", "--disable-userns"]
    if spec.user is not None:
        uid, gid = spec.user
        args += ["--uid", str(uid), "--gid", str(gid)]
    if spec.network:
        args.append("--share-net")
    args += ["--as-pid-1", "--die-with-parent", "--new-session", "--hostname", "tdapp",
             "--info-fd", Fd(Descriptor.INFO), "--clearenv"]
    for name, value in spec.env.items():
        args += ["--setenv", name, value]
    args += ["--tmpfs", "/"]
    for entry in entries:
        if entry.is_symlink():
            args += ["--symlink", os.readlink(entry), f"/{entry.name}"]
        else:
            args += ["--ro-bind", str(entry), f"/{entry.name}"]
    size = str(tmp_size_of(spec))
    args += ["--proc", "/proc", "--dev", "/dev", "--size", size, "--tmpfs", _SHM,
             "--size", size, "--tmpfs", _TMP]

    placed: list[tuple[str, list[Option]]] = []
    targets: dict[str, str] = {}

    def place(target: str, what: str, op: list[Option]) -> None:
        if target in targets:
            raise InputError(f"{what} and {targets[target]} are both placed at {target}")
        if target in ("/proc", "/dev", _TMP, _SHM):
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
        mode = spec.file_modes.get(path)
        perms = [] if mode is None else ["--perms", f"{mode & 0o7777:04o}"]
        place(target, f"injected file {target}",
              [*perms, "--ro-bind-data", Fd(Descriptor.INJECTED_FILE, i), target])
    placed.sort(key=lambda p: (p[0].count("/"), p[0]))
    for _, op in placed:
        args += op
    args += ["--remount-ro", "/dev", "--remount-ro", "/", "--chdir", cwd]
    return args, [argv0, *spec.argv[1:]], files


# ------------------------------------------------------------------------ run


def run_sandboxed(spec: SandboxSpec, *, echo: bool = True) -> SandboxResult:
    """Run ``spec.argv`` in the sandbox and return how it ended.

    Never raises for the program's own failure (see :func:`require_success`).
    Raises :class:`UnavailableError` if bubblewrap is missing and
    :class:`InputError` if the spec is unusable or the sandbox cannot be set up.
    With ``echo`` the program's output is copied to this process's stderr.
    """
    find_bwrap()
    options, program, files = _build_args(spec)
    rlimits = None
    if spec.memory_limit is not None or spec.stack_limit is not None:
        rlimits = (spec.memory_limit if spec.memory_limit is not None else -1,
                   spec.stack_limit if spec.stack_limit is not None else -1)
    ended = run_bwrap(program, options, [content for _, content in files], rlimits=rlimits,
                      timeout=spec.timeout, echo=echo)
    stdout, stderr, rc = ended.stdout, ended.stderr, ended.returncode
    if ended.timed_out:
        return SandboxResult(128 + signal.SIGKILL, signal.SIGKILL, stdout, stderr, True,
                             spec.timeout)
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
        limit = f" of {result.time_limit:g} s" if result.time_limit is not None else ""
        msg = f"the program ran past its time limit{limit} and was killed"
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

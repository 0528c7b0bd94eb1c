"""Attacks on ``tdapp run``'s orchestration, through ``tdapp up`` and real runs.

A crafted input bundle (1 GiB of zeros in an extra folder), a DApp that floods
its output volume, one that rewrites a file in place and puts its mtime back,
one that hangs, and a zip-encrypted output bundle given to ``tdapp decrypt``.
Each test asserts what the attacker was after did not happen: memory or disk
filled, a change lost, a tag moved, something uploaded, a traceback. The
plaintext folder's own rules (memory only, never TMPDIR) are checked in-process.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_attack_bundle import RawMember, write_zip, zeros
from walk_fixtures import PYTHON_HOST, Walk, output_tag, push, running_up, transfer_objects

from tdapp.errors import ProgramFailedError, UnavailableError
from tdapp.runtime import workspace

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is missing")
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")

HEAP = 256 * 1024 * 1024
INPUT, OUTPUT = "encrypted-input-files", "encrypted-output-files"
PROBE = r"""
import os, signal, sys, time
IN, OUT = '/encryptedInputs', '/encryptedOutputs'
mode = open(os.path.join(IN, 'mode')).read().strip()
if mode == 'tiny':
    total = sum(os.path.getsize(os.path.join(IN, name)) for name in os.listdir(IN))
    open(os.path.join(OUT, 'result.txt'), 'w').write(f'{total}\n')
elif mode == 'rewrite':
    path = os.path.join(OUT, 'state.txt')
    if not os.path.exists(path):
        open(path, 'w').write('AAAA')
    else:
        before = os.stat(path)
        assert open(path).read() == 'AAAA'
        with open(path, 'r+') as handle:
            handle.write('BBBB')
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
        after = os.stat(path)
        assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
elif mode == 'flood':
    limit, written, block = int(open(os.path.join(IN, 'limit')).read()), 0, b'x' * (1 << 20)
    try:
        with open(os.path.join(OUT, 'flood'), 'wb', buffering=0) as handle:
            while written < limit:
                written += handle.write(block)
    except OSError as error:
        print(f'flood: wrote {written} bytes: {error.strerror}', file=sys.stderr)
        sys.exit(1)
elif mode == 'wait':
    open(os.path.join(OUT, 'marker'), 'w').write('running')
    while not os.path.exists(os.path.join(OUT, 'go')):
        time.sleep(0.02)
    os.remove(os.path.join(OUT, 'go'))
elif mode == 'hang':
    try:
        os.kill(os.getppid(), signal.SIGSTOP)
    except OSError:
        pass
    while True:
        time.sleep(1)
"""


@pytest.fixture(scope="module")
def walk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Walk]:
    with running_up(tmp_path_factory.mktemp("walk")) as started:
        app = tmp_path_factory.mktemp("probe")
        (app / "probe.py").write_text(PROBE)
        started.tdapp("build", str(app), "--name", "probe", "-o",
                      str(started.example / "KEYS" / "probe.yml"),
                      "--entrypoint", "/usr/bin/python3 -I /probe.py",
                      "--heap", str(HEAP), *PYTHON_HOST)
        yield started


def probe(walk: Walk, files: dict[str, str]) -> list[str]:
    return push(walk, files, "probe", "probe.yml")


def with_url(command: list[str], url: str) -> list[str]:
    changed = list(command)
    changed[changed.index("--url") + 1] = url
    return changed


def run(walk: Walk, command: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    runner = dataclasses.replace(walk, env={**walk.env, **env}) if env else walk
    return runner.tdapp("run", "probe", *command, "--push", walk.push, check=False)


def fetch(url: str, target: Path) -> Path:
    subprocess.run(["curl", "--silent", "--show-error", "--fail", "--output", str(target), url],
                   check=True, timeout=60)
    return target


def upload(walk: Walk, bundle: Path) -> str:
    from tdapp.transfer import upload as send

    return send(bundle, walk.push)


def decrypt_bundle(walk: Walk, bundle: Path) -> Path:
    zips, outputs = walk.example / "ZIP", walk.example / "OUTPUTS"
    for folder in (zips, outputs):
        shutil.rmtree(folder)
        folder.mkdir()
    shutil.copy(bundle, zips / "out.zip")
    walk.tdapp("decrypt")
    return outputs


def members_of(bundle: Path, volume: str) -> list[RawMember]:
    with zipfile.ZipFile(bundle) as archive:
        return [RawMember(info.filename, archive.read(info), info.CRC, info.file_size)
                for info in archive.infolist() if info.filename.startswith(f"{volume}/")]


SMALL_MEMORY = 64 * 1024 * 1024
_IN_SMALL_MEMORY = ('mount -t tmpfs -o size=$SMALL tmpfs /dev/shm && '
                    'mount -t tmpfs -o size=$SMALL tmpfs "$TMPDIR" && exec "$@"')


def run_in_small_memory(walk: Walk, command: list[str],
                        tmpdir: Path) -> subprocess.CompletedProcess[str]:
    """``tdapp run`` in a mount namespace of its own where /dev/shm and TMPDIR are 64 MiB
    tmpfs: a runtime that put the gibibyte in either would get ENOSPC, not a refusal."""
    tmpdir.mkdir()
    return subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", _IN_SMALL_MEMORY, "sh",
         sys.executable, "-m", "tdapp", "run", "probe", *command, "--push", walk.push],
        cwd=walk.example, env={**walk.env, "TMPDIR": str(tmpdir), "SMALL": str(SMALL_MEMORY)},
        capture_output=True, text=True, timeout=300, check=False, stdin=subprocess.DEVNULL)


@as_root
def test_an_extra_folder_of_1_gib_of_zeros_is_refused_before_it_is_unpacked(
        walk: Walk, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    command = probe(walk, {"mode": "tiny", "data.txt": "hello\n"})
    original = fetch(command[command.index("--url") + 1], tmp_path / "push.zip")
    bomb = tmp_path / "bomb.zip"
    write_zip(bomb, [*members_of(original, INPUT), *members_of(original, OUTPUT),
                     zeros("extra/zeros", 1024)])
    assert bomb.stat().st_size < 4 * 1024 * 1024
    url = upload(walk, bomb)
    before_tag, before_objects = output_tag(walk, monkeypatch), transfer_objects(walk)

    done = run_in_small_memory(walk, with_url(command, url), tmp_path / "tmpdir")
    assert done.returncode == 3 and done.stdout == "", done.stderr
    assert "'extra/zeros'" in done.stderr and "100 times (the limit)" in done.stderr
    assert "Traceback" not in done.stderr and "No space left" not in done.stderr
    assert output_tag(walk, monkeypatch) == before_tag
    assert transfer_objects(walk) == before_objects


@dataclasses.dataclass(frozen=True)
class TinyRun:
    input_bytes: int
    output: Path


@pytest.fixture(scope="module")
def tiny_run(walk: Walk, tmp_path_factory: pytest.TempPathFactory) -> TinyRun:
    """A 16 MiB input, a program that writes a few bytes: the output bundle it published."""
    big = secrets.token_hex(8 * 1024 * 1024)
    done = run(walk, probe(walk, {"mode": "tiny", "big.txt": big}))
    assert done.returncode == 0, done.stderr
    output = fetch(done.stdout.strip(), tmp_path_factory.mktemp("tiny") / "out.zip")
    return TinyRun(len(big) + len("tiny"), output)


def test_the_output_bundle_holds_only_the_volume_that_changed(
        walk: Walk, tiny_run: TinyRun) -> None:
    with zipfile.ZipFile(tiny_run.output) as archive:
        names = archive.namelist()
    assert names and all(name.startswith(f"{OUTPUT}/") for name in names), names
    assert tiny_run.output.stat().st_size < 64 * 1024
    outputs = decrypt_bundle(walk, tiny_run.output)
    assert (outputs / "result.txt").read_text() == f"{tiny_run.input_bytes}\n"


def test_a_same_size_rewrite_with_its_mtime_restored_is_sealed(
        walk: Walk, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    command = probe(walk, {"mode": "rewrite"})
    original = fetch(command[command.index("--url") + 1], tmp_path / "push.zip")
    first = run(walk, command)
    assert first.returncode == 0, first.stderr
    after_first = fetch(first.stdout.strip(), tmp_path / "first.zip")
    assert (decrypt_bundle(walk, after_first) / "state.txt").read_text() == "AAAA"
    first_tag = output_tag(walk, monkeypatch)

    # The next run's inputs: the input volume as pushed, the output volume as run 1 left it.
    second_input = tmp_path / "second-input.zip"
    write_zip(second_input, [*members_of(original, INPUT), *members_of(after_first, OUTPUT)])
    second = run(walk, with_url(command, upload(walk, second_input)))
    assert second.returncode == 0, second.stderr
    assert output_tag(walk, monkeypatch) != first_tag
    after_second = fetch(second.stdout.strip(), tmp_path / "second.zip")
    assert (decrypt_bundle(walk, after_second) / "state.txt").read_text() == "BBBB"


@as_root
def test_a_dapp_writing_past_its_allowance_gets_enospc_and_moves_no_tag(
        walk: Walk, monkeypatch: pytest.MonkeyPatch) -> None:
    command = probe(walk, {"mode": "flood", "limit": str(3 * HEAP)})
    before_tag, before_objects = output_tag(walk, monkeypatch), transfer_objects(walk)
    done = run(walk, command)
    assert done.returncode == 9 and done.stdout == "", done.stderr
    assert "No space left on device" in done.stderr
    written = int(done.stderr.split("flood: wrote ")[1].split(" bytes")[0])
    assert written <= HEAP + workspace.SLACK_BYTES + 1024 * 1024  # the allowance, not 3 heaps
    assert output_tag(walk, monkeypatch) == before_tag
    assert transfer_objects(walk) == before_objects


@as_root
@pytest.mark.timeout(120)
def test_while_the_program_runs_its_plaintext_is_a_private_sized_tmpfs_not_tmpdir(
        walk: Walk, tmp_path: Path) -> None:
    secret = secrets.token_hex(16)
    command = probe(walk, {"mode": "wait", "secret.txt": secret})
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    runner = dataclasses.replace(walk, env={**walk.env, "TMPDIR": str(tmpdir)})
    log = tmp_path / "run.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "tdapp", "run", "probe", *command, "--push", walk.push],
            cwd=walk.example, env=runner.env, stdin=subprocess.DEVNULL, stdout=output,
            stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not (markers := list(workspace.SHM.glob(f"tdapp-run-{process.pid}-*/{OUTPUT}/"
                                                      "marker"))):
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the program did not start"
            time.sleep(0.05)
        plain_root = markers[0].parent.parent
        assert os.path.ismount(plain_root)
        assert workspace.filesystem_type(plain_root) == "tmpfs"
        info = os.statvfs(plain_root)
        assert HEAP <= info.f_blocks * info.f_frsize <= HEAP + 2 * workspace.SLACK_BYTES
        assert plain_root.stat().st_mode & 0o777 == 0o700
        for path in tmpdir.rglob("*"):  # ciphertext only in the ordinary temporary folder
            assert path.name != "marker"
            assert not path.is_file() or secret.encode() not in path.read_bytes(), path
        (markers[0].parent / "go").write_text("")
        assert process.wait(timeout=60) == 0, log.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert not plain_root.exists()
    assert list(tmpdir.iterdir()) == []


@pytest.mark.timeout(120)
def test_a_hanging_dapp_is_killed_at_the_time_limit_and_publishes_nothing(
        walk: Walk, monkeypatch: pytest.MonkeyPatch) -> None:
    from tdapp.client.announce import announced
    from tdapp.core.address import Address
    from tdapp.runtime.run import RunRequest, run_dapp

    command = probe(walk, {"mode": "hang"})
    before_tag, before_objects = output_tag(walk, monkeypatch), transfer_objects(walk)
    arguments = dict(zip(command[::2], command[1::2], strict=True))
    monkeypatch.setenv("TDAPP_HOME", str(walk.home))
    request = RunRequest(image="probe", session_id=arguments["--sessionID"],
                         cas=Address.parse(arguments["--secretManagementService"]),
                         url=arguments["--url"], push=walk.push, las=announced("las"),
                         timeout=3.0)
    with pytest.raises(ProgramFailedError) as failed:
        run_dapp(request, log=lambda line: None)
    assert failed.value.exit_code == 9
    assert "time limit of 3 s" in failed.value.message
    assert output_tag(walk, monkeypatch) == before_tag
    assert transfer_objects(walk) == before_objects


def test_decrypt_of_a_zip_encrypted_bundle_is_one_clear_line(
        walk: Walk, tiny_run: TinyRun, tmp_path: Path) -> None:
    good = tiny_run.output
    flagged = tmp_path / "flagged.zip"
    write_zip(flagged, [dataclasses.replace(member, flags=0x1)
                        for member in members_of(good, OUTPUT)])
    zips, outputs = walk.example / "ZIP", walk.example / "OUTPUTS"
    for folder in (zips, outputs):
        shutil.rmtree(folder)
        folder.mkdir()
    shutil.copy(flagged, zips / "out.zip")
    refused = walk.tdapp("decrypt", check=False)
    assert refused.returncode == 3, refused.stderr
    lines = refused.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("tdapp: error: "), refused.stderr
    assert "zip-encrypted" in lines[0] and "internal error" not in lines[0]
    assert list(outputs.iterdir()) == []


# -- the plaintext folder, in-process ------------------------------------------------------


@pytest.fixture
def tmpdir_watched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "tmpdir"
    folder.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(folder))
    return folder


@pytest.mark.parametrize("shm_kind", ["missing", "disk"])
def test_without_a_tmpfs_at_dev_shm_an_unprivileged_run_is_refused_and_nothing_goes_to_tmpdir(
        tmp_path: Path, tmpdir_watched: Path, shm_kind: str) -> None:
    shm = tmp_path / "shm"
    if shm_kind == "disk":
        shm.mkdir()  # tmp_path is on the disk, not a tmpfs
        assert workspace.filesystem_type(shm) != "tmpfs"
    with pytest.raises(UnavailableError) as refused, \
            workspace.plaintext_folder(4096, 1, HEAP, print, shm=shm, privileged=False):
        pytest.fail("a plaintext folder was given")
    assert str(shm) in str(refused.value) and "only in memory" in str(refused.value)
    assert list(tmpdir_watched.iterdir()) == []
    assert not shm.exists() or list(shm.iterdir()) == []


def test_root_that_may_not_mount_falls_to_dev_shm_only_if_it_is_a_tmpfs(
        tmp_path: Path, tmpdir_watched: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(folder: Path, size: int, inodes: int) -> None:
        raise UnavailableError(f"cannot mount a private tmpfs at {folder}: not permitted")

    monkeypatch.setattr(workspace, "_mount_tmpfs", refuse)
    for shm in (tmp_path / "missing", tmp_path):
        with pytest.raises(UnavailableError, match="only in memory"), \
                workspace.plaintext_folder(4096, 1, HEAP, print, shm=shm, privileged=True):
            pytest.fail("a plaintext folder was given")
    assert list(tmpdir_watched.iterdir()) == []
    assert [p.name for p in tmp_path.iterdir()] == ["tmpdir"]


@as_root
@pytest.mark.parametrize("shm_kind", ["missing", "disk"])
def test_as_root_the_plaintext_is_a_private_tmpfs_of_the_computed_size(
        tmp_path: Path, tmpdir_watched: Path, shm_kind: str) -> None:
    shm = tmp_path / "shm"
    if shm_kind == "disk":
        shm.mkdir()
    allowance = 8 * 1024 * 1024
    with workspace.plaintext_folder(1024 * 1024, 10, allowance, print, shm=shm,
                                    privileged=True) as folder:
        assert workspace.filesystem_type(folder) == "tmpfs" and os.path.ismount(folder)
        info = os.statvfs(folder)
        assert info.f_blocks * info.f_frsize == 1024 * 1024 + allowance + workspace.SLACK_BYTES
        with pytest.raises(OSError, match="No space left"), (folder / "fill").open("wb") as f:
            for _ in range(16):
                f.write(bytes(1024 * 1024))
                f.flush()
    assert not folder.exists()
    assert list(tmpdir_watched.iterdir()) == []


@as_root
def test_a_symlink_at_the_plaintext_path_is_never_mounted_through(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    planted = tmp_path / "planted"
    planted.symlink_to(victim)
    with pytest.raises((UnavailableError, OSError)):
        workspace._mount_tmpfs(planted, 1024 * 1024, 16)
    assert not os.path.ismount(victim) and not os.path.ismount(planted)

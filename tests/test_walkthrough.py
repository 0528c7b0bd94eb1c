"""The seed's walkthrough, driven through ``tdapp`` as a user would, and its attacks."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cas_fixtures import free_port

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is missing")


@dataclass
class Walk:
    home: Path
    example: Path
    push: str
    env: dict[str, str]

    def tdapp(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([sys.executable, "-m", "tdapp", *args], cwd=self.example,
                              env=self.env, capture_output=True, text=True, timeout=300,
                              check=False)
        if check:
            assert done.returncode == 0, f"tdapp {' '.join(args)}:\n{done.stderr}"
        return done


@pytest.fixture(scope="module")
def walk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Walk]:
    root = tmp_path_factory.mktemp("walk")
    home = root / "home"
    env = {"PATH": os.environ["PATH"], "HOME": str(root), "TDAPP_HOME": str(home),
           "LANG": "C.UTF-8"}
    ports = [free_port() for _ in range(3)]
    process = subprocess.Popen(
        [sys.executable, "-m", "tdapp", "up", "--cas-port", str(ports[0]),
         "--las-port", str(ports[1]), "--transfer-port", str(ports[2])],
        env=env, stdout=subprocess.DEVNULL, stderr=open(root / "up.log", "wb"),  # noqa: SIM115
        start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not (home / "up.json").exists():
            assert process.poll() is None, (root / "up.log").read_text()
            assert time.monotonic() < deadline, "tdapp up did not start"
            time.sleep(0.1)
        example = root / "EXAMPLE"
        for folder in ("KEYS", "INPUTS", "OUTPUTS", "ZIP"):
            (example / folder).mkdir(parents=True)
        walk = Walk(home, example, f"http://127.0.0.1:{ports[2]}/upload", env)
        walk.tdapp("build", str(REPO / "examples" / "copy_dapp"), "--name", "copy_demo",
                   "-o", str(example / "KEYS" / "copy_dapp.yml"))
        yield walk
    finally:
        process.terminate()
        process.wait(timeout=30)


def push(walk: Walk, files: dict[str, str]) -> list[str]:
    inputs = walk.example / "INPUTS"
    shutil.rmtree(inputs)
    inputs.mkdir()
    for name, text in files.items():
        (inputs / name).write_text(text)
    command = walk.tdapp("encryptedpush", "--application", "copy_demo",
                         "-t", "KEYS/copy_dapp.yml").stdout.strip()
    assert command.startswith("--sessionID tdapp-") and "/application " in command
    assert " --secretManagementService 127.0.0.1:" in command and " --url http" in command
    return shlex.split(command)


def fetch(url: str, target: Path) -> None:
    subprocess.run(["curl", "--silent", "--show-error", "--fail", "--output", str(target), url],
                   check=True, timeout=60)


def test_the_walkthrough_prints_hello_world_and_hello_together(walk: Walk) -> None:
    command = push(walk, {"f1.txt": "Hello world\n", "f2.txt": "Hello together\n"})
    url = walk.tdapp("run", "copy_demo", *command, "--push", walk.push).stdout.strip()
    assert url.startswith("http://127.0.0.1:") and "\n" not in url
    fetch(url, walk.example / "ZIP" / "encryptedOutputFiles.zip")
    walk.tdapp("decrypt")
    assert (walk.example / "OUTPUTS" / "f1.txt").read_text() == "Hello world\n"
    assert (walk.example / "OUTPUTS" / "f2.txt").read_text() == "Hello together\n"

    again = walk.tdapp("run", "copy_demo", *command, "--push", walk.push, check=False)
    assert again.returncode != 0 and again.stdout == ""
    assert "encrypted-output-files" in again.stderr
    assert "tag mismatch (rollback or tampering)" in again.stderr


def test_decrypt_refuses_tampered_foreign_and_old_outputs(walk: Walk) -> None:
    zips = walk.example / "ZIP"
    outputs = walk.example / "OUTPUTS"
    first = push(walk, {"a.txt": "first session\n"})
    first_state = (walk.example / "KEYS" / "tdapp-session.json").read_bytes()
    foreign = walk.example / "foreign.zip"
    fetch(walk.tdapp("run", "copy_demo", *first, "--push", walk.push).stdout.strip(), foreign)

    second = push(walk, {"b.txt": "second session\n"})
    original_url = second[second.index("--url") + 1]
    url = walk.tdapp("run", "copy_demo", *second, "--push", walk.push).stdout.strip()
    good = walk.example / "good.zip"
    fetch(url, good)
    shutil.rmtree(outputs)
    outputs.mkdir()
    (outputs / "keep.txt").write_text("mine")

    def refused(bundle: Path, reason: str) -> None:
        for old in zips.iterdir():
            old.unlink()
        shutil.copy(bundle, zips / "encryptedOutputFiles.zip")
        done = walk.tdapp("decrypt", check=False)
        assert done.returncode != 0, done.stderr
        assert reason in done.stderr, done.stderr
        assert sorted(p.name for p in outputs.iterdir()) == ["keep.txt"]

    flipped = walk.example / "flipped.zip"
    _flip_in_object(good, flipped)
    refused(flipped, "failed authentication")
    refused(foreign, "wrong key")
    older = walk.example / "older.zip"
    fetch(original_url, older)
    refused(older, "tag mismatch (rollback or tampering)")
    (walk.example / "KEYS" / "tdapp-session.json").write_bytes(first_state)


def _flip_in_object(source: Path, target: Path) -> None:
    with zipfile.ZipFile(source) as reading, zipfile.ZipFile(target, "w") as writing:
        flipped = False
        for member in reading.infolist():
            data = reading.read(member)
            if not flipped and "encrypted-output-files/objects/" in member.filename and data:
                data = bytes([data[0] ^ 1]) + data[1:]
                flipped = True
            writing.writestr(member, data)
    assert flipped


def test_host_flags_cannot_change_the_command(walk: Walk) -> None:
    command = push(walk, {"x.txt": "x\n"})
    done = walk.tdapp("run", "copy_demo", *command, "--push", walk.push, "--command", "/bin/sh",
                      check=False)
    assert done.returncode == 2 and "--command" in done.stderr

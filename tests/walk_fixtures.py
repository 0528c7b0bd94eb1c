"""Shared by the end-to-end tests: ``tdapp up`` on free ports and a user's EXAMPLE folder."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from cas_fixtures import free_port

PYTHON_HOST = ("--host-path", "/usr/bin/python3", "--host-path", "/usr/bin/python3.*",
               "--host-path", "/usr/lib/python3*")


@dataclass
class Walk:
    home: Path
    example: Path
    push: str
    env: dict[str, str]

    def tdapp(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([sys.executable, "-m", "tdapp", *args], cwd=self.example,
                              env=self.env, capture_output=True, text=True, timeout=300,
                              check=False, stdin=subprocess.DEVNULL)
        if check:
            assert done.returncode == 0, f"tdapp {' '.join(args)}:\n{done.stderr}"
        return done


@contextmanager
def running_up(root: Path, *extra: str) -> Iterator[Walk]:
    """``tdapp up`` for a fresh user in ``root``, with KEYS, INPUTS, OUTPUTS and ZIP ready."""
    home = root / "home"
    env = {"PATH": os.environ["PATH"], "HOME": str(root), "TDAPP_HOME": str(home),
           "LANG": "C.UTF-8"}
    ports = [free_port() for _ in range(3)]
    with (root / "up.log").open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "tdapp", "up", "--cas-port", str(ports[0]),
             "--las-port", str(ports[1]), "--transfer-port", str(ports[2]), *extra],
            env=env, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not (home / "up.json").exists():
            assert process.poll() is None, (root / "up.log").read_text()
            assert time.monotonic() < deadline, "tdapp up did not start"
            time.sleep(0.1)
        example = root / "EXAMPLE"
        for folder in ("KEYS", "INPUTS", "OUTPUTS", "ZIP"):
            (example / folder).mkdir(parents=True)
        yield Walk(home, example, f"http://127.0.0.1:{ports[2]}/upload", env)
    finally:
        process.terminate()
        process.wait(timeout=30)


def push(walk: Walk, files: dict[str, str], application: str = "copy_demo",
         template: str = "copy_dapp.yml") -> list[str]:
    """Fill INPUTS with ``files`` and run encryptedpush; returns the arguments for tdapp run."""
    inputs = walk.example / "INPUTS"
    shutil.rmtree(inputs)
    inputs.mkdir()
    for name, text in files.items():
        (inputs / name).write_text(text)
    command = walk.tdapp("encryptedpush", "--application", application,
                         "-t", f"KEYS/{template}").stdout.strip()
    assert command.startswith("--sessionID tdapp-") and "/application " in command, command
    assert " --secretManagementService 127.0.0.1:" in command and " --url http" in command
    return shlex.split(command)


def transfer_objects(walk: Walk) -> set[Path]:
    return {path for path in (walk.home / "transfer").rglob("*") if path.is_file()}


def output_tag(walk: Walk, monkeypatch: pytest.MonkeyPatch) -> str:
    from tdapp.client.cas_client import CasClient
    from tdapp.core.address import Address

    state = json.loads((walk.example / "KEYS" / "tdapp-session.json").read_text())
    monkeypatch.setenv("TDAPP_HOME", str(walk.home))
    answer = CasClient.connect(Address.parse(state["cas"])).request(
        "GET", f"/v1/volume-tags?session={state['session']}&volume=encrypted-output-files")
    return str(answer["tag"])

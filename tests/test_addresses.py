"""Addresses come from one place, and a service that cannot be reached is named with
where its address came from: the flag, the environment, ``up.json``, the one pinned
CAS, or the default (docs/cli.md, "Commands")."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])  # closed again when the block ends


def _tdapp(home: Path, *args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    environment = {key: value for key, value in os.environ.items()
                   if not key.startswith("TDAPP_")}
    environment.update({"TDAPP_HOME": str(home), **(env or {})})
    done = subprocess.run([sys.executable, "-m", "tdapp", *args], env=environment,
                          capture_output=True, text=True, timeout=60, check=False,
                          stdin=subprocess.DEVNULL, cwd=home.parent)
    return done.returncode, done.stderr


@pytest.fixture
def home(tmp_path: Path) -> Path:
    folder = tmp_path / "home"
    folder.mkdir(mode=0o700)
    return folder


def test_an_unreachable_cas_is_named_with_the_origin_of_its_address(home: Path) -> None:
    port = _closed_port()
    # Not pinned (a first contact) or pinned and unreachable: the origin is named.
    code, err = _tdapp(home, "session", "list", "--cas", f"127.0.0.1:{port}")
    assert code == 7 and f"127.0.0.1:{port} (from --cas) is not pinned" in err, err
    code, err = _tdapp(home, "cas", "attest", f"127.0.0.1:{port}")
    assert code == 6 and f"cannot reach the CAS at 127.0.0.1:{port}" in err, err
    code, err = _tdapp(home, "session", "list", "-s", f"127.0.0.1:{port}")
    assert code == 7 and "(from --cas)" in err, err
    code, err = _tdapp(home, "session", "list", env={"TDAPP_CAS": f"127.0.0.1:{port}"})
    assert code == 7 and f"127.0.0.1:{port} (from $TDAPP_CAS)" in err, err
    (home / "up.json").write_text(json.dumps({"cas": f"127.0.0.1:{port}"}))
    code, err = _tdapp(home, "session", "list")
    assert code == 7 and f"(announced by tdapp up in {home / 'up.json'})" in err, err
    (home / "up.json").unlink()
    pins = home / "pins"
    pins.mkdir(exist_ok=True)
    for old in pins.iterdir():
        old.unlink()
    (pins / f"127.0.0.1_{port}.crt").write_text("not read for the address")
    code, err = _tdapp(home, "session", "list")
    assert code == 4 and f"127.0.0.1:{port}" in err and "the only CAS pinned" in err, err


def test_the_default_address_says_it_is_the_default(home: Path) -> None:
    code, err = _tdapp(home, "las", "platform", env={"TDAPP_LAS": ""})
    if code == 0:
        pytest.skip("a LAS answers at the default address on this machine")
    assert code == 6 and "127.0.0.1:18766 (the default: no --las, $TDAPP_LAS or running " \
                         "tdapp up)" in err, err


def test_an_unreachable_push_target_is_named_before_anything_runs(home: Path) -> None:
    port = _closed_port()
    target = f"http://127.0.0.1:{port}/upload"
    source = home.parent / "f.txt"
    source.write_text("x")
    code, err = _tdapp(home, "run", "nothing", "--sessionID", "s/application", "-s",
                       "127.0.0.1:1", "--url", "file:///nowhere", "--push", target)
    assert code != 0 and f"{target} (from --push)" in err, err

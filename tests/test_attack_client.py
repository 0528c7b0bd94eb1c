"""Attacks on the client workflow and ``tdapp up``, driven through ``tdapp`` as a user would.

Each test performs the attack (a second push into one KEYS, a CAS swapped in
behind the pinned address, a second ``tdapp up`` on taken ports or the same
home) and asserts its effect did not happen: keys still on disk and usable,
nothing sent to the swapped-in CAS, nothing written to OUTPUTS, the running
``tdapp up``'s announcement and state untouched.
"""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from cas_fixtures import certificate_fingerprint, free_port
from walk_fixtures import Walk, push, running_up

from tdapp.tls import new_private_key, pem, save_private_key, self_signed

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is missing")


def _build_copy_demo(walk: Walk) -> None:
    walk.tdapp("build", str(REPO / "examples" / "copy_dapp"), "--name", "copy_demo",
               "-o", str(walk.example / "KEYS" / "copy_dapp.yml"))


@pytest.fixture(scope="module")
def walk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Walk]:
    with running_up(tmp_path_factory.mktemp("attack-client")) as started:
        _build_copy_demo(started)
        yield started


def _session_of(command: list[str]) -> str:
    return command[command.index("--sessionID") + 1].split("/")[0]


def _fetch(url: str, target: Path) -> None:
    response = httpx.get(url, timeout=60)
    response.raise_for_status()
    target.write_bytes(response.content)


def _decrypt(walk: Walk, bundle: Path, *options: str) -> subprocess.CompletedProcess[str]:
    """Put ``bundle`` alone in ZIP, empty OUTPUTS, and run tdapp decrypt."""
    zips, outputs = walk.example / "ZIP", walk.example / "OUTPUTS"
    shutil.rmtree(zips)
    zips.mkdir()
    shutil.copy(bundle, zips / "encryptedOutputFiles.zip")
    shutil.rmtree(outputs)
    outputs.mkdir()
    return walk.tdapp("decrypt", *options, check=False)


def _outputs(walk: Walk) -> dict[str, str]:
    return {path.name: path.read_text() for path in (walk.example / "OUTPUTS").iterdir()}


def test_a_second_push_into_one_keys_keeps_both_sessions_decryptable(walk: Walk) -> None:
    first = push(walk, {"a.txt": "first session\n"})
    second = push(walk, {"b.txt": "second session\n"})
    names = [_session_of(first), _session_of(second)]
    kept = walk.example / "KEYS" / "sessions"
    for name in names:
        state = kept / f"{name}.json"
        assert stat.S_IMODE(state.stat().st_mode) == 0o600
        assert json.loads(state.read_text())["session"] == name
    keys = {json.loads((kept / f"{name}.json").read_text())["volumes"]
            ["encrypted-output-files"]["key"] for name in names}
    assert len(keys) == 2
    latest = json.loads((walk.example / "KEYS" / "tdapp-session.json").read_text())
    assert latest["session"] == names[1]

    bundles = []
    for number, command in enumerate((first, second)):
        bundle = walk.example / f"out-{number}.zip"
        _fetch(walk.tdapp("run", "copy_demo", *command, "--push", walk.push).stdout.strip(),
               bundle)
        bundles.append(bundle)
    for bundle, name, expected in zip(bundles, names,
                                      ({"a.txt": "first session\n"},
                                       {"b.txt": "second session\n"}), strict=True):
        done = _decrypt(walk, bundle)
        assert done.returncode == 0, done.stderr
        assert f"session {name}" in done.stderr
        assert _outputs(walk) == expected


def test_a_keys_folder_of_an_older_version_keeps_working_and_is_migrated(walk: Walk) -> None:
    command = push(walk, {"old.txt": "from before\n"})
    name = _session_of(command)
    older = walk.example / "OLDKEYS"
    older.mkdir()
    legacy = (walk.example / "KEYS" / "tdapp-session.json").read_bytes()
    (older / "tdapp-session.json").write_bytes(legacy)
    bundle = walk.example / "old.zip"
    _fetch(walk.tdapp("run", "copy_demo", *command, "--push", walk.push).stdout.strip(), bundle)
    done = _decrypt(walk, bundle, "--conf", "OLDKEYS")
    assert done.returncode == 0, done.stderr
    assert _outputs(walk) == {"old.txt": "from before\n"}

    newer = walk.tdapp("encryptedpush", "--application", "copy_demo", "--conf", "OLDKEYS",
                       "-t", "KEYS/copy_dapp.yml").stdout.split()
    assert (older / "sessions" / f"{name}.json").read_bytes() == legacy
    assert (older / "sessions" / f"{_session_of(newer)}.json").is_file()
    done = _decrypt(walk, bundle, "--conf", "OLDKEYS")
    assert done.returncode == 0 and f"session {name}" in done.stderr, done.stderr


@contextmanager
def recording_tls_server(port: int, workdir: Path) -> Iterator[tuple[str, list[str]]]:
    """A stand-in CAS on ``port`` that records every connection; yields (its PEM, records)."""
    key = new_private_key()
    certificate = self_signed(key, "not the CAS you pushed to", hosts=("127.0.0.1",))
    (workdir / "other.crt").write_bytes(pem(certificate))
    save_private_key(key, workdir / "other.key")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(workdir / "other.crt", workdir / "other.key")
    records: list[str] = []
    listener = socket.create_server(("127.0.0.1", port))
    listener.settimeout(0.2)
    stopping = threading.Event()

    def serve() -> None:
        while not stopping.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            records.append("connection")
            with connection:
                connection.settimeout(5)
                try:
                    with context.wrap_socket(connection, server_side=True) as tls:
                        records.append(tls.recv(65536).decode(errors="replace"))
                except OSError:
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield pem(certificate).decode(), records
    finally:
        stopping.set()
        listener.close()
        thread.join(timeout=10)


def test_decrypt_refuses_another_cas_pinned_for_the_address_and_sends_it_nothing(
        tmp_path: Path) -> None:
    with running_up(tmp_path) as walk:
        _build_copy_demo(walk)
        command = push(walk, {"secret.txt": "for the original CAS only\n"})
        cas_port = int(json.loads((walk.home / "up.json").read_text())["cas"].split(":")[1])
        bundle = tmp_path / "pushed.zip"  # holds the output volume at its first tag
        _fetch(command[command.index("--url") + 1], bundle)
    pin = walk.home / "pins" / f"127.0.0.1_{cas_port}.crt"
    original = certificate_fingerprint(pin.read_text())
    outputs = walk.example / "OUTPUTS"
    (outputs / "keep.txt").write_text("mine")
    shutil.copy(bundle, walk.example / "ZIP" / "encryptedOutputFiles.zip")

    # The original CAS is gone; another one answers on its address, and its
    # certificate is what is pinned there now (an --accept of it, or an edit).
    with recording_tls_server(cas_port, tmp_path) as (other_pem, records):
        pin.write_text(other_pem)
        other = certificate_fingerprint(other_pem)
        done = walk.tdapp("decrypt", check=False)
    assert records == [], done.stderr
    assert sorted(path.name for path in outputs.iterdir()) == ["keep.txt"]
    assert done.returncode == 7, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("tdapp: error: "), done.stderr
    assert original in lines[0] and other in lines[0]


def _up(walk: Walk, *args: str) -> subprocess.CompletedProcess[str]:
    """A second ``tdapp up`` for the same user; it must give up, so a timeout is a failure."""
    process = subprocess.Popen([sys.executable, "-m", "tdapp", "up", *args], env=walk.env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        out, err = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        process.terminate()
        out, err = process.communicate(timeout=30)
        pytest.fail(f"the second tdapp up kept running:\n{err}")
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def _home_listing(walk: Walk) -> set[str]:
    return {path.relative_to(walk.home).as_posix() for path in walk.home.rglob("*")
            if "transfer" not in path.parts}


def _still_serving(walk: Walk, announced: dict[str, str]) -> None:
    cas_host, cas_port = announced["cas"].split(":")
    presented = ssl.get_server_certificate((cas_host, int(cas_port)), timeout=10)
    pinned = (walk.home / "pins" / f"{cas_host}_{cas_port}.crt").read_text()
    assert certificate_fingerprint(presented) == certificate_fingerprint(pinned)
    assert httpx.get(f"http://{announced['las']}/v1/platform", timeout=10).status_code == 200
    assert httpx.get(announced["push"].replace("/upload", "/d/x/y"), timeout=10).status_code < 500


def test_a_second_up_on_taken_ports_changes_nothing_of_the_running_one(
        walk: Walk, tmp_path: Path) -> None:
    up_json = (walk.home / "up.json").read_bytes()
    announced = json.loads(up_json)
    ports = {name: announced[name].split(":")[-1].split("/")[0] for name in ("cas", "las")}
    ports["push"] = announced["push"].rsplit(":", 1)[1].split("/")[0]
    listing = _home_listing(walk)

    same = _up(walk, "--cas-port", ports["cas"], "--las-port", ports["las"],
               "--transfer-port", ports["push"])
    # Free CAS and LAS ports: the transfer port is taken last, after any state would be made.
    fresh = tmp_path / "fresh-state"
    last = _up(walk, "--state-dir", str(fresh), "--cas-port", str(free_port()),
               "--las-port", str(free_port()), "--transfer-port", ports["push"])

    assert not fresh.exists()
    assert (walk.home / "up.json").read_bytes() == up_json
    assert _home_listing(walk) == listing
    _still_serving(walk, announced)
    for done, port in ((same, ports["cas"]), (last, ports["push"])):
        assert done.returncode == 6, done.stderr
        lines = done.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("tdapp: error: "), done.stderr
        assert f"127.0.0.1:{port}" in lines[0] and "Address already in use" in lines[0]


def test_a_second_up_for_the_same_home_is_refused_and_hides_nothing(
        walk: Walk, tmp_path: Path) -> None:
    up_json = (walk.home / "up.json").read_bytes()
    fresh = tmp_path / "fresh-state"
    done = _up(walk, "--state-dir", str(fresh), "--cas-port", str(free_port()),
               "--las-port", str(free_port()), "--transfer-port", str(free_port()))
    assert not fresh.exists()
    assert (walk.home / "up.json").read_bytes() == up_json
    _still_serving(walk, json.loads(up_json))
    assert done.returncode == 8, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and "another tdapp up is already serving" in lines[0], done.stderr


def test_up_removes_only_the_up_json_it_wrote(tmp_path: Path) -> None:
    for folder in ("own", "replaced"):
        (tmp_path / folder).mkdir()
    with running_up(tmp_path / "own") as walk:
        pass
    assert not (walk.home / "up.json").exists()

    with running_up(tmp_path / "replaced") as walk:
        someone_else = json.dumps({"cas": "127.0.0.1:1", "las": "127.0.0.1:2",
                                   "push": "http://127.0.0.1:3/upload", "pid": 1,
                                   "owner": "0" * 32}).encode()
        (walk.home / "up.json").write_bytes(someone_else)
    assert (walk.home / "up.json").read_bytes() == someone_else

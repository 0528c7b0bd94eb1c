"""An iExec task run by tdapp: its computed.json sealed with the digest and the enclave signature.

Through ``tdapp`` (a real ``tdapp up``, bubblewrap, sim evidence): the session
names the task (``IEXEC_TASK_ID``), the requester reads the task's enclave
challenge address beforehand (``tdapp session read --challenge``), the run fills
``computed.json`` in ``/iexec_out``, and the requester recovers that address from
the signature over the result digest with the Ethereum library. The program
never sees the challenge key; another task or a changed result does not verify.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from walk_fixtures import PYTHON_HOST, Walk, running_up

from tdapp.iexec.digest import recover_signer, web2_result_digest

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "iexec_hello"
WORKER = "0x" + "ab" * 20
pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is missing")


@pytest.fixture(scope="module")
def task(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Walk, dict[str, str]]]:
    with running_up(tmp_path_factory.mktemp("iexec")) as walk:
        measurement = walk.tdapp("build", str(EXAMPLE / "app"), "--name", "iexec_hello",
                                 "--entrypoint", "/usr/bin/python3 -I /app.py",
                                 "--heap", "256M", *PYTHON_HOST).stdout.strip()
        task_id = "0x" + os.urandom(32).hex()
        (walk.example / "INPUTS" / "words.txt").write_text("four words of input\n")
        env = {**walk.env, "MRENCLAVE": measurement, "TASK_ID": task_id}
        line = subprocess.run(
            [sys.executable, "-m", "tdapp", "encryptedpush", "-a", "iexec_hello", "-t",
             str(EXAMPLE / "iexec_hello.yml")], cwd=walk.example, env=env, text=True,
            capture_output=True, check=False, timeout=120)
        assert line.returncode == 0, line.stderr
        command = line.stdout.split()
        session = command[command.index("--sessionID") + 1].split("/")[0]
        address = walk.tdapp("session", "read", session, "--challenge", "application")
        url = walk.tdapp("run", "iexec_hello", *command, "--push", walk.push,
                         "--iexec-worker", WORKER).stdout.strip()
        bundle = walk.example / "ZIP" / "out.zip"
        subprocess.run(["curl", "--silent", "--fail", "--output", str(bundle), url],
                       check=True, timeout=60)
        walk.tdapp("decrypt", "--encrypted", str(bundle))
        yield walk, {"task_id": task_id, "session": session,
                     "address": address.stdout.strip(), "measurement": measurement}


def test_the_run_seals_computed_json_and_the_challenge_address_signed_it(
        task: tuple[Walk, dict[str, str]]) -> None:
    walk, facts = task
    outputs = walk.example / "OUTPUTS"
    assert (outputs / "result.txt").read_text().splitlines() == [
        f"task {facts['task_id']}", "words.txt: 4 words"]
    computed = json.loads((outputs / "computed.json").read_text())
    assert computed["deterministic-output-path"] == "/iexec_out/result.txt"
    assert computed["task-id"] == facts["task_id"]
    digest = "0x" + hashlib.sha256((outputs / "result.txt").read_bytes()).hexdigest()
    assert computed["result-digest"] == digest
    assert "0x" + web2_result_digest(outputs / "result.txt").hex() == digest
    signer = recover_signer(facts["task_id"], WORKER, digest, computed["enclave-signature"])
    assert signer == facts["address"] and signer.startswith("0x") and len(signer) == 42


def test_another_task_worker_or_result_does_not_verify(
        task: tuple[Walk, dict[str, str]]) -> None:
    walk, facts = task
    computed = json.loads((walk.example / "OUTPUTS" / "computed.json").read_text())
    signature, digest = computed["enclave-signature"], computed["result-digest"]
    flipped = digest[:-1] + ("0" if digest[-1] != "0" else "1")
    for task_id, worker, result in (("0x" + "00" * 32, WORKER, digest),
                                    (facts["task_id"], "0x" + "cd" * 20, digest),
                                    (facts["task_id"], WORKER, flipped)):
        assert recover_signer(task_id, worker, result, signature) != facts["address"]


def test_the_program_never_sees_the_challenge_key(task: tuple[Walk, dict[str, str]]) -> None:
    walk, facts = task
    environment = (walk.example / "OUTPUTS" / "env.txt").read_text()
    # (LC_CTYPE: Python's own C-locale coercion, PEP 538, inside the program.)
    names = {line.split("=", 1)[0] for line in environment.splitlines()} - {"LC_CTYPE"}
    assert names == {"IEXEC_TASK_ID", "IEXEC_IN", "IEXEC_OUT", "IEXEC_INPUT_FILES_NUMBER",
                     "IEXEC_INPUT_FILE_NAME_1", "PWD"}
    # Nothing 64-hex but the task id is anywhere in what it was given.
    values = [line.split("=", 1)[1] for line in environment.splitlines()]
    assert [v for v in values if len(v) == 66 and v.startswith("0x")] == [facts["task_id"]]


def test_the_challenge_address_is_for_readers_only_and_per_task(
        task: tuple[Walk, dict[str, str]], tmp_path: Path) -> None:
    walk, facts = task
    again = walk.tdapp("session", "read", facts["session"], "--challenge", "application")
    assert again.stdout.strip() == facts["address"]  # the same key at every read
    not_a_task = walk.tdapp("session", "read", facts["session"], "--challenge", "other",
                            check=False)
    assert not_a_task.returncode == 3 and "not an iExec task" in not_a_task.stderr
    stranger = {**walk.env, "TDAPP_HOME": str(tmp_path / "home"), "HOME": str(tmp_path)}
    cas = json.loads((walk.home / "up.json").read_text())["cas"]
    fingerprint = walk.tdapp("cas", "attest", cas).stdout.strip()
    subprocess.run([sys.executable, "-m", "tdapp", "cas", "attest", cas, "--accept", fingerprint],
                   env=stranger, check=True, capture_output=True, timeout=60)
    refused = subprocess.run([sys.executable, "-m", "tdapp", "session", "read", facts["session"],
                              "--challenge", "application", "--cas", cas], env=stranger,
                             capture_output=True, text=True, timeout=60, check=False)
    assert refused.returncode == 7 and facts["address"] not in refused.stdout + refused.stderr


def test_challenge_keys_are_one_per_session_and_task_and_only_from_the_master_key() -> None:
    from tdapp.cas.challenges import ChallengeKeys
    from tdapp.cas.sealing import MasterKey

    task, other = "0x" + "11" * 32, "0x" + "22" * 32
    keys = ChallengeKeys(MasterKey(b"\x01" * 32))
    same = ChallengeKeys(MasterKey(b"\x01" * 32))  # another replica
    assert keys.for_task("s", task).address == same.for_task("s", task.upper()).address
    addresses = {keys.for_task("s", task).address, keys.for_task("s", other).address,
                 keys.for_task("t", task).address,
                 ChallengeKeys(MasterKey(b"\x02" * 32)).for_task("s", task).address}
    assert len(addresses) == 4
    assert "0x" not in repr(keys) and "1111" not in repr(keys.for_task("s", task))[20:]


def test_the_ethereum_libraries_leave_the_recursion_limit_alone(tmp_path: Path) -> None:
    """py_ecc (under eth-account) raises the recursion limit to 100,000 when imported; with
    it a deeply nested JSON body would crash a CAS or a client (a C stack overflow) instead
    of being refused. Everything that signs or checks iExec results leaves it as it was."""
    probe = ("import json, sys\n"
             "before = sys.getrecursionlimit()\n"
             "import tdapp.cas.serve, tdapp.runtime.run, tdapp.cli.result, tdapp.iexec.digest\n"
             "assert sys.getrecursionlimit() == before, sys.getrecursionlimit()\n"
             "try:\n"
             "    json.loads('[' * 200000 + ']' * 200000)\n"
             "except RecursionError:\n"
             "    print('refused')\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=120, check=False, cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.strip() == "refused", done.stderr[-2000:]

"""The worker pool on a real Redis: workers are separate ``tdapp worker`` processes.

Many tasks over two workers (one per queue) all finish and decrypt, the second
queue's tasks wait for its worker; a worker SIGKILLed mid-run leaves its task
to the other, which completes it exactly once; a task delivered twice runs
once; Redis restarted with queued tasks loses none; a message rewritten to
another image or session is refused, and moves nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cas_fixtures import free_port
from walk_fixtures import PYTHON_HOST, Walk, running_up

REPO = Path(__file__).resolve().parent.parent
REDIS = shutil.which("redis-server")
pytestmark = [pytest.mark.skipif(REDIS is None, reason="redis-server is missing (make sysdeps)"),
              pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is missing")]
SLEEPER = '''import os, shutil, time
time.sleep(float(os.environ.get("SLEEP", "3")))
for name in os.listdir("/encryptedInputs"):
    shutil.copy(os.path.join("/encryptedInputs", name), "/encryptedOutputs")
'''


@dataclass
class Redis:
    port: int
    folder: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        assert REDIS is not None
        self.process = subprocess.Popen(
            [REDIS, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder),
             "--appendonly", "yes", "--appendfsync", "always", "--save", ""],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=20)
            self.process = None


@dataclass
class Pool:
    walk: Walk
    redis: Redis
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def env(self) -> dict[str, str]:
        return {**self.walk.env, "TDAPP_BROKER": self.redis.url}

    def tdapp(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([sys.executable, "-m", "tdapp", *args], cwd=self.walk.example,
                              env=self.env(), capture_output=True, text=True, timeout=180,
                              check=False, stdin=subprocess.DEVNULL)
        if check:
            assert done.returncode == 0, f"tdapp {' '.join(args)}:\n{done.stderr}"
        return done

    def start_worker(self, name: str, *queues: str) -> subprocess.Popen[bytes]:
        log = (self.walk.example.parent / f"worker-{name}.log").open("ab")
        arguments = [sys.executable, "-m", "tdapp", "worker", "--tee", "sim",
                     "--concurrency", "2", "--hostname", f"{name}@%h",
                     "--visibility-timeout", "6"]
        for queue in queues:
            arguments += ["--queue", queue]
        process = subprocess.Popen(arguments, cwd=self.walk.example, env=self.env(),
                                   stdout=log, stderr=log, start_new_session=True)
        self.workers.append(process)
        return process

    def kill(self, process: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
        if process.poll() is None:
            os.killpg(process.pid, sig)
        process.wait(timeout=60)

    # In-process for the many calls (what the commands call), through ``tdapp`` for the
    # rest: a subprocess per call would make this module minutes long.
    def push(self, text: str, application: str = "copy_demo",
             template: str = "copy_dapp.yml") -> list[str]:
        from tdapp.client.workflow import encrypted_push
        from tdapp.core.address import Address

        inputs = self.walk.example / "INPUTS"
        shutil.rmtree(inputs)
        inputs.mkdir()
        (inputs / "f.txt").write_text(text)
        announced = json.loads((self.walk.home / "up.json").read_text())
        with self.home():
            result = encrypted_push(
                application=application, template=self.walk.example / "KEYS" / template,
                conf=self.walk.example / "KEYS", inputs=inputs,
                cas=Address.parse(announced["cas"]), push=self.walk.push,
                variables={}, las=announced["las"])
        return result.command_line.split()

    @contextlib.contextmanager
    def home(self) -> Iterator[None]:
        before = os.environ.get("TDAPP_HOME")
        os.environ["TDAPP_HOME"] = str(self.walk.home)
        try:
            yield
        finally:
            if before is None:
                del os.environ["TDAPP_HOME"]
            else:
                os.environ["TDAPP_HOME"] = before

    def app(self) -> Any:
        from tdapp.pool.app import make_app

        return make_app(self.redis.url)

    def submit(self, command: list[str], queue: str = "sim",
               application: str = "copy_demo") -> str:
        from tdapp.pool.client import submit
        from tdapp.pool.messages import Queue, RunTask

        arguments = dict(zip(command[::2], command[1::2], strict=True))
        task = RunTask(image=application, session_id=arguments["--sessionID"],
                       cas=arguments["--secretManagementService"],
                       urls=(arguments["--url"],), push=self.walk.push)
        return submit(self.app(), task, Queue(queue))

    def status(self, task: str) -> dict[str, object]:
        from tdapp.pool.client import status

        return status(self.app(), task).as_json()

    def wait(self, task: str, timeout: float = 120) -> dict[str, object]:
        from tdapp.pool.client import wait

        return wait(self.app(), task, timeout).as_json()

    def decrypted(self, url: str, session: str) -> str:
        from tdapp.client.workflow import decrypt

        bundle = self.walk.example / "ZIP" / f"{session}.zip"
        subprocess.run(["curl", "--silent", "--fail", "--output", str(bundle), url],
                       check=True, timeout=60)
        out = self.walk.example / "OUT" / session
        with self.home():
            decrypt(conf=self.walk.example / "KEYS", encrypted=bundle, out=out,
                    session=session)
        return (out / "f.txt").read_text()


def _session(command: list[str]) -> str:
    return command[command.index("--sessionID") + 1].split("/")[0]


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    root = tmp_path_factory.mktemp("pool")
    redis = Redis(free_port(), root / "redis")
    redis.folder.mkdir()
    redis.start()
    (root / "up").mkdir()
    try:
        with running_up(root / "up") as walk:
            walk.tdapp("build", str(REPO / "examples" / "copy_dapp"), "--name", "copy_demo",
                       "-o", str(walk.example / "KEYS" / "copy_dapp.yml"))
            sleeper = root / "sleeper"
            sleeper.mkdir()
            (sleeper / "app.py").write_text(SLEEPER)
            walk.tdapp("build", str(sleeper), "--name", "sleeper", "--entrypoint",
                       "/usr/bin/python3 -I /app.py", "--heap", "256M", *PYTHON_HOST,
                       "-o", str(walk.example / "KEYS" / "sleeper.yml"))
            pool = Pool(walk, redis)
            yield pool
            for process in pool.workers:
                pool.kill(process)
    finally:
        redis.stop()


def test_tasks_over_two_queues_all_finish_and_decrypt(pool: Pool) -> None:
    first = pool.start_worker("sim", "sim")
    pushed = [pool.push(f"task {n}\n") for n in range(20)]
    # The first through tdapp submit as a user types it, the rest in-process.
    first_task = pool.tdapp("submit", "copy_demo", *pushed[0], "--push", pool.walk.push,
                            "--json").stdout
    assert json.loads(first_task)["queue"] == "sim"  # the CAS says the session is sim
    tasks = [json.loads(first_task)["task"]] + [
        pool.submit(command, "sgx" if n >= 16 else "sim")
        for n, command in enumerate(pushed) if n > 0]
    assert pool.tdapp("task", "wait", tasks[0], "--timeout", "120").stdout.startswith("http")
    done = [pool.wait(task) for task in tasks[:16]]
    assert all(found["state"] == "SUCCESS" for found in done), done
    # No worker takes the second queue yet: its tasks wait, untouched.
    assert {pool.status(task)["state"] for task in tasks[16:]} == {"PENDING"}
    second = pool.start_worker("other", "sgx")
    done += [pool.wait(task) for task in tasks[16:]]
    assert all(found["state"] == "SUCCESS" for found in done), done
    assert {str(found["worker"]).split("@")[0] for found in done[:16]} == {"sim"}
    assert {str(found["worker"]).split("@")[0] for found in done[16:]} == {"other"}
    for n, (command, found) in enumerate(zip(pushed, done, strict=True)):
        assert pool.decrypted(str(found["url"]), _session(command)) == f"task {n}\n"
    listed = pool.tdapp("task", "list", "--limit", "20").stdout
    assert "SUCCESS" in listed and "tdapp tasks (20)" in listed
    pool.kill(second)
    pool.kill(first)


def test_a_task_delivered_twice_runs_once(pool: Pool) -> None:
    worker = pool.start_worker("twice", "sim")
    command = pool.push("once\n")
    task = pool.submit(command)
    first = pool.wait(task)
    assert first["state"] == "SUCCESS" and first["duplicate"] is False
    # The broker delivers the same task again (same id, same message).
    import redis as redis_client

    store = redis_client.Redis(port=pool.redis.port)
    meta = json.loads(store.get(f"celery-task-meta-{task}") or b"{}")
    store.delete(f"celery-task-meta-{task}")
    from tdapp.pool.app import make_app
    from tdapp.pool.client import submit
    from tdapp.pool.messages import Queue, RunTask

    submit(make_app(pool.redis.url), RunTask.from_json(meta["args"][0]), Queue.SIM,
           task_id=task)
    second = pool.wait(task)
    assert second["state"] == "SUCCESS" and second["duplicate"] is True
    assert second["url"] == first["url"]
    assert _commits(pool, _session(command)) == 1
    pool.kill(worker)


def _commits(pool: Pool, session: str) -> int:
    audit = pool.tdapp("cas", "audit", "--session", session, "--json").stdout
    events = [json.loads(line) for line in audit.splitlines()]
    return sum(1 for event in events if event["event"] == "run.commit"
               and event["outcome"] == "accepted" and "receipt for instance" in event["reason"])


def test_a_worker_killed_mid_run_leaves_its_task_to_another_which_runs_it_once(
        pool: Pool) -> None:
    doomed = pool.start_worker("doomed", "sim")
    command = pool.push("survives\n", application="sleeper", template="sleeper.yml")
    task = pool.submit(command, application="sleeper")
    _started(pool, task)
    time.sleep(1)  # inside the program's sleep: nothing committed, nothing uploaded
    objects = _transfer_objects(pool)
    pool.kill(doomed, signal.SIGKILL)
    rescuer = pool.start_worker("rescuer", "sim")
    found = pool.wait(task, timeout=120)
    assert found["state"] == "SUCCESS", found
    assert str(found["worker"]).startswith("rescuer@") and found["duplicate"] is False
    assert pool.decrypted(str(found["url"]), _session(command)) == "survives\n"
    assert _commits(pool, _session(command)) == 1  # one tag move, one receipt
    assert len(_transfer_objects(pool) - objects) == 1  # only the rescuer's output
    pool.kill(rescuer)


def _started(pool: Pool, task: str) -> None:
    deadline = time.monotonic() + 60
    while pool.status(task)["state"] != "STARTED":
        assert time.monotonic() < deadline, "the task never started"
        time.sleep(0.2)


def _transfer_objects(pool: Pool) -> set[Path]:
    return {path for path in (pool.walk.home / "transfer").rglob("*") if path.is_file()}


def test_a_redis_restart_loses_no_queued_task(pool: Pool) -> None:
    pushed = [pool.push(f"queued {n}\n") for n in range(3)]
    tasks = [pool.submit(command) for command in pushed]  # no worker running
    pool.redis.stop()
    pool.redis.start()
    worker = pool.start_worker("after-restart", "sim")
    for command, task in zip(pushed, tasks, strict=True):
        found = pool.wait(task)
        assert found["state"] == "SUCCESS", found
        assert pool.decrypted(str(found["url"]), _session(command)).startswith("queued ")
    pool.kill(worker)


def _rewrite_queued(pool: Pool, queue: str, change: dict[str, str]) -> None:
    """Edit the queued task message in Redis itself, as a broker writer would."""
    import base64

    import redis as redis_client

    store = redis_client.Redis(port=pool.redis.port)
    (raw,) = store.lrange(queue, 0, -1)
    message = json.loads(raw)
    body = json.loads(base64.b64decode(message["body"]))
    body[0][0].update(change)
    message["body"] = base64.b64encode(json.dumps(body).encode()).decode()
    store.lset(queue, 0, json.dumps(message))


def test_a_message_rewritten_in_redis_is_refused_and_moves_nothing(pool: Pool) -> None:
    mine, other = pool.push("mine\n"), pool.push("other\n")
    # Another image than the session names: the CAS refuses its measurement, and the
    # session's audit log says so.
    image_task = pool.submit(mine)
    _rewrite_queued(pool, "sim", {"image": "sleeper"})
    worker = pool.start_worker("rewritten", "sim")
    found = pool.wait(image_task)
    assert found["state"] == "FAILURE" and "refused" in str(found["error"]), found
    audit = pool.tdapp("cas", "audit", "--session", _session(mine), "--json").stdout
    assert any(json.loads(line)["outcome"] == "refused" and "measurement" in
               json.loads(line)["reason"] for line in audit.splitlines())
    pool.kill(worker)
    # Another session than the bundle's: that session's keys do not open the bundle.
    session_task = pool.submit(mine)
    _rewrite_queued(pool, "sim", {"session_id": f"{_session(other)}/application"})
    worker = pool.start_worker("rewritten", "sim")
    found = pool.wait(session_task)
    assert found["state"] == "FAILURE", found
    assert _commits(pool, _session(mine)) == 0 and _commits(pool, _session(other)) == 0
    pool.kill(worker)


def test_cancel_ends_a_running_task_and_moves_nothing(pool: Pool) -> None:
    worker = pool.start_worker("cancel", "sim")
    command = pool.push("never\n", application="sleeper", template="sleeper.yml")
    task = pool.submit(command, application="sleeper")
    _started(pool, task)
    pool.tdapp("task", "cancel", task)
    found = pool.wait(task, timeout=60)
    assert found["state"] in ("REVOKED", "FAILURE"), found
    time.sleep(1)
    assert _commits(pool, _session(command)) == 0
    # The sandboxed program is gone with it: no process of the sleeper remains.
    leftover = subprocess.run(["pgrep", "-f", "python3 -I /app.py"], capture_output=True,
                              text=True, check=False)
    assert leftover.stdout.strip() == "", leftover.stdout
    pool.kill(worker)


def test_a_hardware_session_must_name_its_tee_and_a_message_is_json_only(pool: Pool) -> None:
    command = pool.push("hardware\n")
    session = _session(command)
    document = pool.tdapp("session", "read", session).stdout
    hardware = pool.walk.example / "hardware.yml"
    hardware.write_text(document.replace(f"name: {session}", f"name: {session}-hw")
                        .replace("mode: sim", "mode: hardware")
                        .replace("predecessor: ", "# predecessor: "))
    pool.tdapp("session", "create", str(hardware))
    swapped = list(command)
    swapped[swapped.index("--sessionID") + 1] = f"{session}-hw/application"
    refused = pool.tdapp("submit", "copy_demo", *swapped, "--push", pool.walk.push,
                         check=False)
    assert refused.returncode == 2 and "--queue sgx, tdx or snp" in refused.stderr
    # The pool's app accepts JSON only: a pickled message is never deserialized.
    from tdapp.pool.app import make_app

    conf = make_app(pool.redis.url).conf
    assert conf.accept_content == ["json"] and conf.task_serializer == "json"
    assert conf.result_accept_content == ["json"] and conf.task_acks_late


def test_tdapp_up_with_workers_is_a_pool_in_one_command(tmp_path: Path) -> None:
    with running_up(tmp_path, "--workers", "1") as walk:
        walk.tdapp("build", str(REPO / "examples" / "copy_dapp"), "--name", "copy_demo",
                   "-o", str(walk.example / "KEYS" / "copy_dapp.yml"))
        (walk.example / "INPUTS" / "f.txt").write_text("Hello pool\n")
        command = walk.tdapp("encryptedpush", "--application", "copy_demo", "-t",
                             "KEYS/copy_dapp.yml").stdout.split()
        announced = json.loads((walk.home / "up.json").read_text())
        assert announced["broker"].startswith("redis://127.0.0.1:")
        task = walk.tdapp("submit", "copy_demo", *command).stdout.strip()
        url = walk.tdapp("task", "wait", task, "--timeout", "120").stdout.strip()
        bundle = walk.example / "ZIP" / "out.zip"
        subprocess.run(["curl", "--silent", "--fail", "--output", str(bundle), url],
                       check=True, timeout=60)
        walk.tdapp("decrypt", "--encrypted", str(bundle))
        assert (walk.example / "OUTPUTS" / "f.txt").read_text() == "Hello pool\n"
    # Stopping tdapp up stops its Redis and workers too.
    leftover = subprocess.run(["pgrep", "-f", f"redis-server.*{tmp_path}"],
                              capture_output=True, text=True, check=False)
    assert leftover.stdout.strip() == ""


def test_a_worker_serves_its_task_metrics(pool: Pool) -> None:
    import httpx

    port = free_port()
    log = (pool.walk.example.parent / "worker-metrics.log").open("ab")
    process = subprocess.Popen(
        [sys.executable, "-m", "tdapp", "worker", "--tee", "sim", "--queue", "sim",
         "--concurrency", "1", "--hostname", "metrics@%h", "--metrics-port", str(port)],
        cwd=pool.walk.example, env=pool.env(), stdout=log, stderr=log, start_new_session=True)
    pool.workers.append(process)
    ok = pool.wait(pool.submit(pool.push("counted\n")))
    bad = pool.wait(pool.submit(pool.push("refused\n"), application="sleeper"))
    assert ok["state"] == "SUCCESS" and bad["state"] == "FAILURE"
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    assert 'tdapp_pool_tasks_total{outcome="success"} 1.0' in text, text
    assert 'tdapp_pool_tasks_total{outcome="failure"} 1.0' in text
    assert "tdapp_pool_task_seconds_bucket" in text
    assert "counted" not in text and "sessionID" not in text  # counts, not contents
    pool.kill(process)


def test_a_worker_lacking_the_image_fetches_it_and_never_replaces_one_it_has(
        pool: Pool) -> None:
    from tdapp.pool.app import make_app
    from tdapp.pool.client import submit, wait
    from tdapp.pool.messages import Queue, RunTask
    from tdapp.transfer import upload

    worker = pool.start_worker("fetch", "sim")
    archive = pool.walk.example / "copy_demo.tar"
    pool.walk.tdapp("image", "export", "copy_demo", str(archive))
    sleeper = pool.walk.example / "sleeper.tar"
    pool.walk.tdapp("image", "export", "sleeper", str(sleeper))
    copy_url, sleeper_url = upload(archive, pool.walk.push), upload(sleeper, pool.walk.push)

    def run(image: str, image_url: str) -> dict[str, object]:
        command = pool.push(f"{image}\n")
        arguments = dict(zip(command[::2], command[1::2], strict=True))
        task = RunTask(image=image, session_id=arguments["--sessionID"],
                       cas=arguments["--secretManagementService"], urls=(arguments["--url"],),
                       push=pool.walk.push, image_url=image_url)
        return wait(make_app(pool.redis.url), submit(make_app(pool.redis.url), task,
                                                     Queue.SIM), 120).as_json()

    fetched = run("copy_fetched", copy_url)  # not on this host: fetched, measured, run
    assert fetched["state"] == "SUCCESS", fetched
    assert "copy_fetched" in pool.walk.tdapp("images").stdout
    # copy_demo is here: another archive under its name is not taken (the run is the
    # host's copy_demo, which the session accepts).
    kept = run("copy_demo", sleeper_url)
    assert kept["state"] == "SUCCESS", kept
    measured = pool.walk.tdapp("measure", "copy_demo").stdout.strip()
    assert measured == pool.walk.tdapp("measure", "copy_fetched").stdout.strip()
    pool.kill(worker)

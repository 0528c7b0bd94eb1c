"""Pool throughput: N small tasks through the worker pool against N sequential ``tdapp run``.

What it measures
    One ``tdapp up`` (CAS, LAS, transfer) and one ``redis-server`` of its own, the
    copy DApp built once, then N sessions pushed per set-up (untimed, in-process):

    sequential   N ``tdapp run`` commands one after the other, as a user would type them.
    pool x1      N tasks submitted at once to one ``tdapp worker`` (concurrency 1).
    pool x2      N tasks submitted at once to two ``tdapp worker`` processes (concurrency 1
                 each), the machine's two cores.

    For the pool: tasks/s (N over the time from the first submit to the last done) and the
    pool's own overhead per task, p50: (done - submitted) minus the run itself (the
    worker's measured run time) minus the time it waited behind other tasks, i.e. for the
    first task of each worker; reported over all tasks as (latency - run - queueing).

How to read it
    Ratios in the same run: pool x2 / sequential (target >= 1.5 on 2 cores) and the
    overhead p50 (target <= 100 ms). The last stdout line is JSON with every figure.

    .venv/bin/python benchmarks/pool_throughput.py [--tasks 50]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit(f"nothing listens on port {port}") from None
            time.sleep(0.05)


class Setup:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.home = root / "home"
        self.example = root / "EXAMPLE"
        for folder in ("KEYS", "INPUTS", "ZIP"):
            (self.example / folder).mkdir(parents=True)
        self.redis_port = free_port()
        self.env = {"PATH": os.environ["PATH"], "HOME": str(root), "TDAPP_HOME": str(self.home),
                    "LANG": "C.UTF-8",
                    "TDAPP_BROKER": f"redis://127.0.0.1:{self.redis_port}/0"}
        self.processes: list[subprocess.Popen[bytes]] = []

    def tdapp(self, *args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "tdapp", *args], cwd=self.example,
                              env=self.env, capture_output=True, text=True, check=False,
                              timeout=600)
        if done.returncode != 0:
            raise SystemExit(f"tdapp {' '.join(args)}: {done.stderr[-800:]}")
        return done.stdout.strip()

    def spawn(self, *args: str, name: str) -> subprocess.Popen[bytes]:
        log = (self.root / f"{name}.log").open("ab")
        process = subprocess.Popen(list(args), cwd=self.example, env=self.env, stdout=log,
                                   stderr=log, start_new_session=True)
        self.processes.append(process)
        return process

    def start(self) -> None:
        redis = shutil.which("redis-server")
        if redis is None:
            raise SystemExit("redis-server is missing (make sysdeps)")
        self.spawn(redis, "--port", str(self.redis_port), "--bind", "127.0.0.1", "--save", "",
                   "--dir", str(self.root), name="redis")
        wait_for_port(self.redis_port)
        ports = [free_port() for _ in range(3)]
        self.spawn(sys.executable, "-m", "tdapp", "up", "--cas-port", str(ports[0]),
                   "--las-port", str(ports[1]), "--transfer-port", str(ports[2]), name="up")
        deadline = time.monotonic() + 60
        while not (self.home / "up.json").exists():
            if time.monotonic() > deadline:
                raise SystemExit("tdapp up did not start")
            time.sleep(0.1)
        self.announced = json.loads((self.home / "up.json").read_text())
        self.tdapp("build", str(REPO / "examples" / "copy_dapp"), "--name", "copy_demo",
                   "-o", str(self.example / "KEYS" / "copy_dapp.yml"))

    def stop(self) -> None:
        for process in reversed(self.processes):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)

    def push(self, count: int) -> list[list[str]]:
        from tdapp.client.workflow import encrypted_push
        from tdapp.core.address import Address

        os.environ["TDAPP_HOME"] = str(self.home)
        inputs = self.example / "INPUTS"
        (inputs / "f.txt").write_text("a small task\n")
        return [encrypted_push(application="copy_demo",
                               template=self.example / "KEYS" / "copy_dapp.yml",
                               conf=self.example / "KEYS", inputs=inputs,
                               cas=Address.parse(self.announced["cas"]),
                               push=self.announced["push"], variables={},
                               las=self.announced["las"]).command_line.split()
                for _ in range(count)]


def sequential(setup: Setup, commands: list[list[str]]) -> dict[str, Any]:
    began = time.perf_counter()
    for command in commands:
        setup.tdapp("run", "copy_demo", *command, "--push", setup.announced["push"],
                    "--receipt", str(setup.root / "receipt.jws"))
    wall = time.perf_counter() - began
    return {"tasks": len(commands), "wall_s": round(wall, 2),
            "tasks_per_s": round(len(commands) / wall, 2)}


def pooled(setup: Setup, commands: list[list[str]], workers: int) -> dict[str, Any]:
    from tdapp.pool.app import make_app
    from tdapp.pool.client import status, submit
    from tdapp.pool.messages import Queue, RunTask

    started = [setup.spawn(sys.executable, "-m", "tdapp", "worker", "--tee", "sim",
                           "--concurrency", "1", "--queue", "sim",
                           "--hostname", f"bench{n}@%h", name=f"worker{n}")
               for n in range(workers)]
    app = make_app(setup.env["TDAPP_BROKER"])
    time.sleep(3)  # the workers are up (not part of any task's time)
    began = time.perf_counter()
    ids = []
    for command in commands:
        arguments = dict(zip(command[::2], command[1::2], strict=True))
        ids.append(submit(app, RunTask(image="copy_demo", session_id=arguments["--sessionID"],
                                       cas=arguments["--secretManagementService"],
                                       urls=(arguments["--url"],),
                                       push=setup.announced["push"]), Queue.SIM))
    pending = set(ids)
    finished: dict[str, Any] = {}
    while pending:
        for ident in list(pending):
            found = status(app, ident)
            if found.finished:
                finished[ident] = found
                pending.discard(ident)
        time.sleep(0.05)
    wall = time.perf_counter() - began
    for process in started:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=60)
    failed = [ident for ident, found in finished.items() if found.state != "SUCCESS"]
    # Overhead per task: its worker's time on it beyond the run: the gap between the end of
    # the worker's previous task (or the submit) and this one's end, minus the run.
    by_worker: dict[str, list[Any]] = {}
    for found in finished.values():
        by_worker.setdefault(str(found.worker), []).append(found)
    overheads = []
    for tasks in by_worker.values():
        tasks.sort(key=lambda found: found.done_at or "")
        previous = None
        for found in tasks:
            done = datetime.fromisoformat(str(found.done_at)).timestamp()
            start = max(found.submitted_at or done, previous or 0.0)
            if found.ran_s is not None:
                overheads.append(done - start - found.ran_s)
            previous = done
    return {"tasks": len(commands), "workers": workers, "failed": len(failed),
            "wall_s": round(wall, 2), "tasks_per_s": round(len(commands) / wall, 2),
            "overhead_p50_ms": round(1000 * statistics.median(overheads), 1)
            if overheads else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=50)
    options = parser.parse_args(argv)
    console = Console(stderr=True)
    with tempfile.TemporaryDirectory(prefix="tdapp-pool-bench-") as work:
        setup = Setup(Path(work))
        try:
            setup.start()
            results = {}
            for name, workers in (("sequential", 0), ("pool x1", 1), ("pool x2", 2)):
                commands = setup.push(options.tasks)
                console.log(f"{name}: {options.tasks} tasks")
                results[name] = (sequential(setup, commands) if workers == 0
                                 else pooled(setup, commands, workers))
        finally:
            setup.stop()
    table = Table(title=f"Pool throughput ({options.tasks} copy-DApp tasks, loopback, sim)")
    for header in ("set-up", "tasks/s", "wall s", "failed", "pool overhead p50 ms"):
        table.add_column(header, justify="left" if header == "set-up" else "right")
    for name, figures in results.items():
        table.add_row(name, f"{figures['tasks_per_s']:.2f}", f"{figures['wall_s']:.1f}",
                      str(figures.get("failed", 0)), str(figures.get("overhead_p50_ms", "—")))
    Console().print(table)
    speedup = results["pool x2"]["tasks_per_s"] / results["sequential"]["tasks_per_s"]
    overhead = results["pool x2"]["overhead_p50_ms"]
    checks = {"pool_x2_over_sequential_ge_1_5": speedup >= 1.5,
              "pool_overhead_p50_le_100ms": overhead is not None and overhead <= 100}
    Console().print(f"pool x2 / sequential: {speedup:.2f}x (target >= 1.5); pool overhead "
                    f"p50 {overhead} ms (target <= 100)")
    print(json.dumps({"benchmark": "pool_throughput", "results": results,
                      "pool_x2_over_sequential": round(speedup, 2), "targets_met": checks}))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())

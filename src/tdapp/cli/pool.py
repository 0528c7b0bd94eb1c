"""``tdapp submit``, ``tdapp task status|wait|list|cancel`` and ``tdapp worker``: the pool."""

from __future__ import annotations

import json
import time

import click

from tdapp.cli.options import complete_image, run_target, table_console
from tdapp.errors import UsageError
from tdapp.pool.messages import Queue

_broker_option = click.option(
    "--broker", default=None, metavar="URL",
    help="The pool's Redis (default: TDAPP_BROKER, else redis://127.0.0.1:6379/0).")


def _app(broker: str | None, visibility_timeout: float | None = None):  # type: ignore[no-untyped-def]
    from tdapp.pool.app import DEFAULT_VISIBILITY_TIMEOUT, broker_url, make_app

    return make_app(broker_url(broker),
                    visibility_timeout=visibility_timeout or DEFAULT_VISIBILITY_TIMEOUT)


@click.command()
@click.argument("image", shell_complete=complete_image)
@run_target
@click.option("--url", "urls", required=True, multiple=True,
              help="Where the worker downloads the encrypted input bundle (repeatable).")
@click.option("--push", default=None, metavar="URL",
              help="Where the worker uploads the output (default: the transfer service tdapp "
                   "up announced).")
@click.option("--queue", type=click.Choice(("sim", "sgx", "tdx", "snp")), default=None,
              help="Which workers may take it, by what they attest (default: sim for a "
                   "session in sim or none mode; a hardware session must name its TEE).")
@click.option("--tee", type=click.Choice(("auto", "sim", "tsm", "gramine")), default="auto",
              show_default=True)
@click.option("--shield", type=click.Choice(("auto", "fuse", "tmpfs")), default="auto",
              show_default=True)
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True, max=1e9),
              default=3600.0, show_default=True, metavar="SECONDS")
@click.option("--iexec-worker", "iexec_worker", default=None, metavar="ADDRESS")
@click.option("--image-url", default=None, metavar="URL",
              help="Where a worker that lacks IMAGE fetches it (an archive of tdapp image "
                   "export, uploaded with tdapp transfer, on S3 or at a URL).")
@_broker_option
@click.option("--json", "as_json", is_flag=True, help="Print {\"task\": ID, \"queue\": Q}.")
def submit(image: str, session_id: str, cas_address: str, urls: tuple[str, ...],
           push: str | None,
           queue: str | None, tee: str, shield: str, timeout: float, iexec_worker: str | None,
           image_url: str | None, broker: str | None, as_json: bool) -> None:
    """Queue a run of IMAGE (the arguments of tdapp run); prints the task id."""
    from tdapp.client.announce import announced
    from tdapp.pool.client import submit as submit_task
    from tdapp.pool.messages import RunTask

    task = RunTask.from_json({
        "image": image, "session_id": session_id, "cas": cas_address, "urls": list(urls),
        "push": announced("push", push, "--push"), "tee": tee, "shield": shield, "timeout": timeout,
        "iexec_worker": iexec_worker, "image_url": image_url})
    chosen = Queue(queue) if queue is not None else _queue_for(task)
    ident = submit_task(_app(broker), task, chosen)
    click.echo(json.dumps({"task": ident, "queue": str(chosen)}) if as_json else ident)


def _queue_for(task: object) -> Queue:
    """sim for a session the CAS says is sim or none; a hardware session must be told."""
    from tdapp.client.cas_client import CasClient
    from tdapp.core.address import Address
    from tdapp.pool.messages import RunTask

    assert isinstance(task, RunTask)
    session, _, service = task.session_id.partition("/")
    answer = CasClient.connect(Address.parse(task.cas), anonymous=True).request_json(
        "POST", "/v1/attestation/nonce", {"session": session, "service": service})
    if answer.get("mode") in ("sim", "none"):
        return Queue.SIM
    raise UsageError(f"session {session} needs hardware attestation: name the TEE its "
                     "workers must have with --queue sgx, tdx or snp")


@click.group()
def task() -> None:
    """Tasks queued with tdapp submit."""


@task.command()
@click.argument("task_id")
@_broker_option
@click.option("--json", "as_json", is_flag=True)
def status(task_id: str, broker: str | None, as_json: bool) -> None:
    """Print a task's state (and its output URL once it succeeded)."""
    from tdapp.pool.client import status as task_status

    _print(task_status(_app(broker), task_id), as_json)


@task.command()
@click.argument("task_id")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=3600.0,
              show_default=True, metavar="SECONDS")
@_broker_option
@click.option("--json", "as_json", is_flag=True)
def wait(task_id: str, timeout: float, broker: str | None, as_json: bool) -> None:
    """Wait for a task to finish; exit 0 only if it succeeded (prints its URL)."""
    from tdapp.errors import ProgramFailedError
    from tdapp.pool.client import wait as wait_task

    found = wait_task(_app(broker), task_id, timeout)
    _print(found, as_json)
    if found.state != "SUCCESS":
        raise ProgramFailedError(f"task {task_id} {found.state.lower()}: {found.error or ''}")


@task.command(name="list")
@click.option("--limit", type=click.IntRange(1, 10000), default=50, show_default=True)
@_broker_option
@click.option("--json", "as_json", is_flag=True)
def list_(limit: int, broker: str | None, as_json: bool) -> None:
    """The latest tasks: state, worker, elapsed, result URL."""
    from rich.table import Table

    from tdapp.pool.client import listed

    tasks = listed(_app(broker), limit)
    if as_json:
        for found in tasks:
            click.echo(json.dumps(found.as_json()))
        return
    table = Table(title=f"tdapp tasks ({len(tasks)})")
    for header in ("task", "state", "worker", "elapsed", "result"):
        table.add_column(header)
    for found in tasks:
        table.add_row(found.id, found.state + (" (duplicate)" if found.duplicate else ""),
                      found.worker or "", _elapsed(found), found.url or found.error or "")
    table_console().print(table)


@task.command()
@click.argument("task_id")
@_broker_option
def cancel(task_id: str, broker: str | None) -> None:
    """Cancel a task: it will not start, or its running program is ended."""
    from tdapp.pool.client import cancel as cancel_task

    cancel_task(_app(broker), task_id)
    click.echo(f"task {task_id} cancelled", err=True)


def _elapsed(found: object) -> str:
    """Submit to done for a finished task, submit to now for the others."""
    from datetime import datetime

    from tdapp.pool.client import TaskStatus

    assert isinstance(found, TaskStatus)
    if found.submitted_at is None:
        return ""
    end = time.time()
    if found.finished and found.done_at:
        try:
            end = datetime.fromisoformat(found.done_at).timestamp()
        except ValueError:
            return ""
    return f"{max(0.0, end - found.submitted_at):.1f} s"


def _print(found: object, as_json: bool) -> None:
    from tdapp.pool.client import TaskStatus

    assert isinstance(found, TaskStatus)
    if as_json:
        click.echo(json.dumps(found.as_json()))
    elif found.state == "SUCCESS":
        click.echo(found.url or "")
        if found.duplicate:
            click.echo(f"task {found.id}: delivered again; its first run's result", err=True)
    else:
        click.echo(found.state + (f": {found.error}" if found.error else ""))


@click.command()
@_broker_option
@click.option("--tee", type=click.Choice(("auto", "sim", "tsm", "gramine")), default="auto",
              show_default=True, help="The attester this worker uses for every task.")
@click.option("--queue", "queues", multiple=True,
              type=click.Choice(("sim", "sgx", "tdx", "snp")),
              help="The queues to take tasks from (default: what --tee can attest).")
@click.option("--concurrency", type=click.IntRange(1, 64), default=2, show_default=True)
@click.option("--las", "las_address", default=None, metavar="HOST:PORT",
              help="The LAS for sim evidence (default: the announced one).")
@click.option("--visibility-timeout", type=click.FloatRange(min=1), default=None,
              metavar="SECONDS", help="When a task whose worker died is delivered again "
                                      "(default 7200; longer than the longest run).")
@click.option("--hostname", default=None, help="This worker's name in tdapp task list.")
@click.option("--metrics-port", type=click.IntRange(1, 65535), default=None, metavar="PORT",
              help="Serve Prometheus metrics (tasks by outcome, run durations) on "
                   "127.0.0.1:PORT/metrics.")
def worker(broker: str | None, tee: str, queues: tuple[str, ...], concurrency: int,
           las_address: str | None, visibility_timeout: float | None,
           hostname: str | None, metrics_port: int | None) -> None:
    """Run tasks from the pool on this host until stopped."""
    from tdapp.pool import metrics

    if metrics_port is not None:
        metrics.prepare()  # before anything imports prometheus_client in this process
        metrics.serve(metrics_port)
    from tdapp.client.announce import announced
    from tdapp.pool.tasks import register

    chosen = list(queues) or _queues_for(tee)
    app = _app(broker, visibility_timeout)
    register(app, las=announced("las", las_address, "--las"), tee=None if tee == "auto" else tee)
    arguments = ["worker", "--loglevel=INFO", f"--concurrency={concurrency}", "--pool=prefork",
                 "-Q", ",".join(chosen), "-E", "--without-mingle", "--without-gossip"]
    if hostname:
        arguments.append(f"--hostname={hostname}")
    app.worker_main(arguments)


def _queues_for(tee: str) -> list[str]:
    from tdapp.attest.attesters import GramineAttester, probe_hardware

    if tee == "sim":
        return ["sim"]
    if tee == "gramine":
        return ["sgx"]
    if tee == "auto":
        found = probe_hardware()
        if found is None:
            return ["sim"]
        if isinstance(found, GramineAttester):
            return ["sgx"]
    raise UsageError("a configfs-tsm host attests TDX or SEV-SNP: say which with --queue tdx "
                     "or --queue snp")




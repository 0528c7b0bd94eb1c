"""The task a pool worker runs: one ``tdapp run`` for one message, exactly one effect.

The message is parsed (JSON, :class:`~tdapp.pool.messages.RunTask`) and run as
``tdapp run`` would with the task's id as the run's *label*: the CAS states it
in the receipt and, when the task is delivered again (its worker died, or the
broker sent it twice), the new run asks the CAS whether a run with that label
committed and reports that run instead of running again. A run that fails
raises, so the result store holds the reason; nothing secret is in it. A
worker's own host settings (its LAS, the attester it may use) come from the
worker's command line, never from the message.
"""

from __future__ import annotations

import logging
import socket
import time
from typing import Any

from celery import Celery, Task

from tdapp.core.address import Address
from tdapp.errors import TdappError
from tdapp.pool.app import TASK_NAME
from tdapp.pool.messages import RunTask
from tdapp.pool.metrics import count

log = logging.getLogger("tdapp.pool")


def _ensure_image(task: RunTask, task_id: str) -> None:
    """Import the task's image from ``image_url`` if this host lacks it.

    An image this host has is never replaced: a message cannot swap the code a host
    runs under a name. What is imported is measured (tdapp image import's checks), and
    the runtime measures it again; the CAS decides whether that measurement may run.
    """
    import tempfile
    from pathlib import Path

    from tdapp.builder import import_image, load_image
    from tdapp.errors import InputError
    from tdapp.transfer import download

    if task.image_url is None:
        return
    try:
        load_image(task.image, verify=False)
        return
    except InputError:
        pass  # not here: fetch it
    with tempfile.TemporaryDirectory(prefix="tdapp-image-") as work:
        archive = Path(work) / "image.tar"
        download(task.image_url, archive)
        measured = import_image(archive, name=task.image)
    log.info("task %s: imported image %s (measurement %s)", task_id, task.image, measured)


class RunFailed(Exception):
    """A run that ended in a refusal or an error: ``kind: reason`` (JSON-safe)."""


def register(app: Celery, *, las: str, tee: str | None) -> None:
    """Register the run task on ``app`` for a worker using LAS ``las`` (and, if given, only
    the attester ``tee``, whatever a message asks)."""
    from tdapp.runtime.iexec_post import worker_address
    from tdapp.runtime.mounts import ShieldKind
    from tdapp.runtime.run import RunRequest, run_labelled

    @app.task(name=TASK_NAME, bind=True)  # type: ignore[untyped-decorator]
    def run(self: Task, message: Any) -> dict[str, Any]:
        task_id = str(self.request.id)
        began = time.monotonic()
        try:
            task = RunTask.from_json(message)
            _ensure_image(task, task_id)
            outcome = run_labelled(RunRequest(
                image=task.image, session_id=task.session_id, cas=Address.parse(task.cas),
                url=task.urls[0], more_urls=task.urls[1:], push=task.push, las=las,
                tee=tee or task.tee, shield=ShieldKind(task.shield), timeout=task.timeout,
                iexec_worker=worker_address(task.iexec_worker), label=task_id),
                log=lambda line: log.info("task %s: %s", task_id, line))
        except TdappError as error:
            count("failure", time.monotonic() - began)
            raise RunFailed(f"{error.kind}: {error.message}") from None
        count("duplicate" if outcome.duplicate else "success", time.monotonic() - began)
        return {"url": outcome.url, "receipt": outcome.receipt,
                "duplicate": outcome.duplicate, "host": socket.gethostname(),
                "ran_s": round(time.monotonic() - began, 4)}

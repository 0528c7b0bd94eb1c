"""Submitting tasks and following them: ``tdapp submit`` and ``tdapp task …``.

The result store is untrusted, so what it holds is read as plain JSON and
checked field by field (:class:`TaskStatus`): nothing from it is unpickled,
imported or executed, and a URL or receipt read from it proves nothing by
itself (``tdapp decrypt`` checks the output against the CAS's tag and receipt).
Submitted task ids are also kept in a sorted set (``tdapp:tasks``) so that
``tdapp task list`` can show tasks no worker has started yet.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from celery import Celery

from tdapp.errors import InputError, UnavailableError
from tdapp.pool.app import TASK_NAME
from tdapp.pool.messages import Queue, RunTask

TASKS_KEY = "tdapp:tasks"
_META = "celery-task-meta-"
FINISHED = frozenset({"SUCCESS", "FAILURE", "REVOKED"})
STATES = frozenset({"PENDING", "RECEIVED", "STARTED", "RETRY", *FINISHED})


@dataclass(frozen=True)
class TaskStatus:
    id: str
    state: str
    submitted_at: float | None
    done_at: str | None = None
    worker: str | None = None
    url: str | None = None
    duplicate: bool = False
    error: str | None = None
    ran_s: float | None = None  # how long the worker's run took (as the worker says)

    @property
    def finished(self) -> bool:
        return self.state in FINISHED

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, "state": self.state, "submitted_at": self.submitted_at,
                "done_at": self.done_at, "worker": self.worker, "url": self.url,
                "duplicate": self.duplicate, "error": self.error, "ran_s": self.ran_s}


def _redis(app: Celery) -> Any:
    try:
        return app.backend.client
    except Exception as error:  # the backend's own connection errors, not ours to list
        raise UnavailableError(f"the pool's result store is unreachable: {error}") from None


def submit(app: Celery, task: RunTask, queue: Queue, *, task_id: str | None = None) -> str:
    """Queue ``task`` on ``queue``; its id."""
    ident = task_id or str(uuid.uuid4())
    try:
        _redis(app).zadd(TASKS_KEY, {ident: time.time()})
        app.send_task(TASK_NAME, args=[task.to_json()], queue=str(queue), task_id=ident)
    except UnavailableError:
        raise
    except Exception as error:  # kombu/redis connection errors
        raise UnavailableError(f"the pool's broker is unreachable: {error}") from None
    return ident


def status(app: Celery, task_id: str) -> TaskStatus:
    """What the result store says of ``task_id`` (PENDING until a worker starts it)."""
    redis = _redis(app)
    try:
        submitted = redis.zscore(TASKS_KEY, task_id)
        raw = redis.get(_META + task_id)
    except Exception as error:
        raise UnavailableError(f"the pool's result store is unreachable: {error}") from None
    return _parsed(task_id, raw, None if submitted is None else float(submitted))


def _parsed(task_id: str, raw: bytes | None, submitted: float | None) -> TaskStatus:
    if raw is None:
        return TaskStatus(task_id, "PENDING", submitted)
    try:
        meta = json.loads(raw)
    except (ValueError, RecursionError):
        meta = None
    if not isinstance(meta, dict) or meta.get("status") not in STATES:
        return TaskStatus(task_id, "UNKNOWN", submitted,
                          error="the result store holds something that is not a task result")
    state, result = str(meta["status"]), meta.get("result")
    done = meta.get("date_done") if isinstance(meta.get("date_done"), str) else None
    worker = meta.get("worker") if isinstance(meta.get("worker"), str) else None
    if state == "SUCCESS" and isinstance(result, dict):
        url = result.get("url") if isinstance(result.get("url"), str) else None
        ran = result.get("ran_s")
        return TaskStatus(task_id, state, submitted, done, worker, url,
                          result.get("duplicate") is True,
                          ran_s=float(ran) if isinstance(ran, int | float) else None)
    if state == "FAILURE":
        message = result.get("exc_message") if isinstance(result, dict) else None
        text = " ".join(str(part) for part in message) if isinstance(message, list) else (
            str(message) if message is not None else "failed")
        return TaskStatus(task_id, state, submitted, done, worker, error=text[:2000])
    return TaskStatus(task_id, state, submitted, done, worker)


def wait(app: Celery, task_id: str, timeout: float, poll: float = 0.2) -> TaskStatus:
    """The task's status once it has finished; UnavailableError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        found = status(app, task_id)
        if found.finished:
            return found
        if time.monotonic() > deadline:
            raise UnavailableError(f"task {task_id} has not finished after {timeout:g} s "
                                   f"(it is {found.state})")
        time.sleep(poll)


def listed(app: Celery, limit: int = 100) -> list[TaskStatus]:
    """The most recently submitted tasks, newest first."""
    try:
        entries = _redis(app).zrevrange(TASKS_KEY, 0, limit - 1, withscores=True)
    except Exception as error:
        raise UnavailableError(f"the pool's result store is unreachable: {error}") from None
    return [status(app, ident.decode() if isinstance(ident, bytes) else str(ident))
            for ident, _ in entries]


def cancel(app: Celery, task_id: str) -> None:
    """Revoke the task; a running one is ended (SIGTERM, then its sandbox dies with it)."""
    if not task_id or len(task_id) > 200:
        raise InputError(f"{task_id!r} is not a task id")
    app.control.revoke(task_id, terminate=True, signal="SIGTERM")

"""The Celery application of the pool: its broker, its safety settings, its one task.

- JSON is the only serializer and the only accepted content: a message from the
  broker can never be a pickle to unpickle.
- Late acknowledgement (``task_acks_late``) and ``task_reject_on_worker_lost``: a
  task is acknowledged only when its run has ended, so a worker that dies
  mid-run leaves it to be delivered again; one task at a time per process
  (``worker_prefetch_multiplier = 1``).
- Redis's ``visibility_timeout`` is when an unacknowledged task is delivered
  again: longer than the longest run (``--visibility-timeout``, default 2 h).
  A redelivery of a run that did commit reports that run (tdapp.pool.tasks).
- Events on (``worker_send_task_events``, ``task_send_sent_event``): Flower works.
"""

from __future__ import annotations

from celery import Celery

TASK_NAME = "tdapp.run"
DEFAULT_BROKER = "redis://127.0.0.1:6379/0"
DEFAULT_VISIBILITY_TIMEOUT = 7200.0


def broker_url(value: str | None) -> str:
    """``--broker``, else ``TDAPP_BROKER``, else the Redis ``tdapp up --workers`` announced,
    else a Redis on this host."""
    from tdapp.client.announce import announced

    return announced("broker", value, "--broker") or DEFAULT_BROKER


def make_app(broker: str, *, visibility_timeout: float = DEFAULT_VISIBILITY_TIMEOUT) -> Celery:
    app = Celery("tdapp", broker=broker, backend=broker)
    app.conf.update(
        task_serializer="json", result_serializer="json", accept_content=["json"],
        result_accept_content=["json"], event_serializer="json",
        task_acks_late=True, task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1, task_track_started=True,
        worker_send_task_events=True, task_send_sent_event=True,
        result_extended=True, result_expires=7 * 24 * 3600,
        broker_transport_options={
            "visibility_timeout": visibility_timeout,
            # How often a worker looks for tasks whose worker died, and how long a dead
            # worker's hold on that search lasts: both well under the visibility timeout.
            "unacked_restore_interval": min(10.0, max(1.0, visibility_timeout / 3)),
            "unacked_mutex_expire": min(300.0, max(5.0, visibility_timeout * 2))},
        result_backend_transport_options={"visibility_timeout": visibility_timeout},
        broker_connection_retry_on_startup=True,
        task_default_queue="sim", worker_hijack_root_logger=False,
    )
    return app

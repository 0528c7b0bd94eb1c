"""iExec tasks in the session language: a service whose environment names ``IEXEC_TASK_ID``.

iExec's SMS writes a task's session with the variables an iExec application
reads (``IEXEC_TASK_ID``, ``IEXEC_IN``, ``IEXEC_OUT``, ``IEXEC_DATASET_FILENAME``,
…) in the service's environment; tdapp takes such a service as an iExec task.
For one, the CAS holds a per-task enclave challenge key, releases it to the
attested runtime (never to the program) and the runtime seals the app's
``computed.json`` in ``IEXEC_OUT`` with the result digest and the enclave
signature (docs/iexec.md). This module only reads what a session says; it
must never decide anything about keys.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from tdapp.policy.model import Session
from tdapp.policy.services import Service

TASK_ID = "IEXEC_TASK_ID"
OUT = "IEXEC_OUT"
IEXEC_OUT = "/iexec_out"  # where every iExec app writes (computed.json names paths in it)
_TASK_ID = re.compile(r"0x[0-9a-fA-F]{64}")


@dataclass(frozen=True)
class IexecTask:
    task_id: str  # 0x + 64 lower-case hex
    out: str  # IEXEC_OUT: where the app writes its result and computed.json
    volume: str | None  # the session volume mounted at ``out`` (None: none is)


def iexec_task_of(session: Session, service: Service) -> IexecTask | None:
    """The iExec task ``service`` runs, or None if it is not one."""
    task_id = service.environment.get(TASK_ID)
    if task_id is None:
        return None
    out = service.environment.get(OUT) or ""
    image = session.image(service.image_name) if service.image_name else None
    mounted = next((mount.name for mount in image.volumes if mount.path == out),
                   None) if image is not None else None
    return IexecTask(task_id.lower(), out, mounted)


def task_id_is_valid(text: str) -> bool:
    return _TASK_ID.fullmatch(text) is not None

"""The runtime event log of a TDX guest: which workloads were measured into RTMR3.

In a TDX confidential VM the runtime, before it asks for a quote, extends
RTMR3 with an event naming the workload it is about to run, through the
kernel's measurement interface (``/sys/class/misc/tdx_guest/measurements/
rtmr3:sha384``, Linux 6.16+), and appends the event to a log. The quote then
carries RTMR3, and the CAS replays the log against it: a log that does not
give the quote's RTMR3 is refused, and one that does shows every workload
this VM has launched, the last of which must be the one the evidence binds.

The log is text in the form of the Confidential Containers attestation
agent's event log: one event per line, ``DOMAIN OPERATION CONTENT``, each
extended as the SHA-384 of its UTF-8 line (no newline):
``RTMR3 = SHA-384(RTMR3 ‖ SHA-384(line))`` from 48 zero bytes at TD start.
tdapp's own events are ``tdapp.dev workload {canonical JSON of the
workload}``. This module owns that form; it must never accept a log it
cannot replay exactly, nor a line that could be read as two events.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from tdapp.attest.binding import Workload
from tdapp.core.canonical import canonical_json
from tdapp.errors import InputError

RTMR_SIZE = 48
DOMAIN = "tdapp.dev"
WORKLOAD_OPERATION = "workload"
MAX_EVENTS = 4096  # a VM that launched more workloads than this should be restarted
MAX_LINE = 4096


class EventLogError(ValueError):
    """A log that is not a well-formed runtime event log."""


@dataclass(frozen=True)
class RuntimeEvent:
    """One event: who logged it (``domain``), what happened, and its details."""

    domain: str
    operation: str
    content: str

    def __post_init__(self) -> None:
        for name in ("domain", "operation"):
            value = getattr(self, name)
            if not value or not value.isprintable() or " " in value:
                raise EventLogError(f"an event's {name} is one printable word")
        if not self.content.isprintable() or len(self.line()) > MAX_LINE:
            raise EventLogError("an event's content is one printable line")

    def line(self) -> str:
        return f"{self.domain} {self.operation} {self.content}"

    def digest(self) -> bytes:
        """What is extended into RTMR3 for this event: SHA-384 of its line."""
        return hashlib.sha384(self.line().encode("utf-8")).digest()

    @classmethod
    def parse(cls, line: str) -> RuntimeEvent:
        domain, _, rest = line.partition(" ")
        operation, _, content = rest.partition(" ")
        event = cls(domain, operation, content)
        if event.line() != line:
            raise EventLogError("an event line is DOMAIN OPERATION CONTENT, single-spaced")
        return event


def workload_event(workload: Workload) -> RuntimeEvent:
    """The event a tdapp runtime extends for the workload it is about to run."""
    content = canonical_json({"measurement": workload.measurement,
                              "session": workload.session, "service": workload.service})
    return RuntimeEvent(DOMAIN, WORKLOAD_OPERATION, content.decode("utf-8"))


def extend(register: bytes, event: RuntimeEvent) -> bytes:
    """``register`` after the kernel extends it with ``event``."""
    return hashlib.sha384(register + event.digest()).digest()


def replay(events: Iterable[RuntimeEvent]) -> bytes:
    """The RTMR3 value a TD that logged ``events`` (and nothing else) has."""
    register = bytes(RTMR_SIZE)
    for event in events:
        register = extend(register, event)
    return register


def parse_log(lines: object) -> tuple[RuntimeEvent, ...]:
    """The events of an evidence's ``event_log`` (a list of lines); EventLogError if not one."""
    if not isinstance(lines, list) or len(lines) > MAX_EVENTS:
        raise EventLogError(f"event_log must be a list of at most {MAX_EVENTS} lines")
    events = []
    for index, line in enumerate(lines):
        if not isinstance(line, str):
            raise EventLogError(f"event_log line {index} is not a string")
        events.append(RuntimeEvent.parse(line))
    return tuple(events)


def last_workload(events: Sequence[RuntimeEvent]) -> Workload | None:
    """The workload of the last tdapp workload event, if any."""
    for event in reversed(events):
        if (event.domain, event.operation) == (DOMAIN, WORKLOAD_OPERATION):
            try:
                fields = json.loads(event.content)
                return Workload(str(fields["measurement"]), str(fields["session"]),
                                str(fields["service"]))
            except (ValueError, KeyError, TypeError, InputError) as error:
                raise EventLogError(f"a tdapp workload event is malformed: {error}") from None
    return None

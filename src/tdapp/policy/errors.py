"""The one error a session document can cause: :class:`SessionError`.

Its text is always one line, ``SOURCE:LINE: KEY.PATH: what is wrong``, so that
a user can go straight to the spot. The parts are kept as attributes for
callers that want to show them differently. A message must never contain a
key or a secret value from the document: validators describe what is wrong
with a value, they do not repeat it.
"""

from __future__ import annotations

from tdapp.errors import InputError

_MAX_DETAIL = 400


def one_line(text: str, limit: int = _MAX_DETAIL) -> str:
    """Fold ``text`` onto one line of bounded length (user input can contain anything)."""
    folded = " ".join(text.split())
    return folded if len(folded) <= limit else folded[: limit - 1] + "…"


class SessionError(InputError):
    """A document that is not a valid session (or not readable as one)."""

    def __init__(self, detail: str, *, source: str, line: int | None = None,
                 path: str = "") -> None:
        self.source = one_line(source, 200)
        self.line = line
        self.path = one_line(path, 200)
        self.detail = one_line(detail)
        where = self.source if line is None else f"{self.source}:{line}"
        text = f"{where}: {self.path}: {self.detail}" if self.path else f"{where}: {self.detail}"
        super().__init__(text)

"""Where tdapp keeps its state: ``$TDAPP_HOME`` (default ``~/.tdapp``).

Owns the layout of that folder. Must never create it with permissions that let
other users read keys.
"""

from __future__ import annotations

import os
from pathlib import Path


def tdapp_home() -> Path:
    configured = os.environ.get("TDAPP_HOME")
    return Path(configured).expanduser() if configured else Path.home() / ".tdapp"


def private_dir(*parts: str) -> Path:
    """A folder under ``$TDAPP_HOME``, created with mode 0700 when missing."""
    path = tdapp_home().joinpath(*parts)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path

"""Command-line options shared by several ``tdapp`` commands (one definition each)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import click

Command = TypeVar("Command", bound=Callable[..., Any])
# The defaults of tdapp.serving.ServerTimeouts, restated so that --help does not
# import the server stack.
HEADER_TIMEOUT = 10.0
BODY_TIMEOUT = 30.0


def server_timeouts(*, header_help: str = "Close a connection whose request headers take "
                                          "longer.",
                    body_help: str = "Close a connection whose request body pauses longer."
                    ) -> Callable[[Command], Command]:
    """``--header-timeout`` and ``--body-timeout``, handed to the command as ``timeouts``
    (a :class:`tdapp.serving.ServerTimeouts`)."""

    def decorate(command: Command) -> Command:
        @functools.wraps(command)
        def with_timeouts(*args: Any, header_timeout: float, body_timeout: float,
                          **kwargs: Any) -> Any:
            from tdapp.serving import ServerTimeouts

            return command(*args, timeouts=ServerTimeouts(header_timeout, body_timeout),
                           **kwargs)

        seconds = click.FloatRange(0, min_open=True)
        decorated = click.option("--body-timeout", default=BODY_TIMEOUT, show_default=True,
                                 metavar="SECONDS", type=seconds, help=body_help)(with_timeouts)
        decorated = click.option("--header-timeout", default=HEADER_TIMEOUT,
                                 show_default=True, metavar="SECONDS", type=seconds,
                                 help=header_help)(decorated)
        return decorated  # type: ignore[return-value]

    return decorate


CAS_HELP = ("The CAS (default: $TDAPP_CAS, else the one tdapp up announced, else the one "
            "CAS pinned, else 127.0.0.1:8081).")


def cas_option(command: Command) -> Command:
    """``--cas``/``-s HOST:PORT`` as ``cas_address`` (None: resolved by
    :func:`tdapp.client.announce.announced`, which notes where it came from)."""
    return click.option("--cas", "-s", "cas_address", default=None, metavar="HOST:PORT",
                        help=CAS_HELP)(command)


def run_target(command: Command) -> Command:
    """``--sessionID`` and ``--secretManagementService``: what ``tdapp run`` and ``tdapp
    submit`` run, named as the seed's walkthrough names it."""
    command = click.option("--secretManagementService", "--cas", "-s", "cas_address",
                           required=True, metavar="HOST:PORT")(command)
    return click.option("--sessionID", "--session-id", "session_id", required=True,
                        metavar="SESSION/SERVICE")(command)


def table_console() -> Any:
    """A console for a table on stdout: the terminal's width, or wide enough that names and
    URLs are not cut when the output goes to a file or a pipe."""
    import sys

    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=220)


def template_variables_from(assignments: tuple[str, ...]) -> dict[str, str]:
    """The environment with each ``-e VAR=VALUE`` over it: what fills a template's $VARs."""
    import os

    from tdapp.errors import UsageError

    variables = dict(os.environ)
    for assignment in assignments:
        name, sep, value = assignment.partition("=")
        if not sep or not name:
            raise UsageError(f"-e {assignment!r} must look like VAR=VALUE")
        variables[name] = value
    return variables


# -- shell completion (docs/cli.md, "Shell completion") ----------------------------------
# Completers read only local state, quickly and quietly: a completion never reaches a
# service and never prints an error into the user's shell.


def complete_image(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[Any]:
    """The names of the images in this user's store."""
    try:
        from tdapp.builder.store import image_store_dir

        names = sorted(entry.name for entry in image_store_dir().iterdir()
                       if entry.is_dir() and not entry.name.startswith("."))
    except Exception:
        return []
    return [name for name in names if name.startswith(incomplete)]


def complete_session(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[Any]:
    """The sessions whose keys the KEYS folder holds (``--conf``, default ./KEYS)."""
    from pathlib import Path

    conf = ctx.params.get("conf") or Path("KEYS")
    try:
        names = sorted(path.name.removesuffix(".json")
                       for path in (Path(conf) / "sessions").glob("*.json")
                       if not path.name.startswith("."))
    except Exception:
        return []
    return [name for name in names if name.startswith(incomplete)]

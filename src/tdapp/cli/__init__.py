"""The ``tdapp`` command: argument parsing and the one error convention.

Every failure ends as one line ``tdapp: error: …`` on stderr and the exit code
of its kind (tdapp.errors.ExitCode); ``tdapp --traceback …`` or ``TDAPP_DEBUG=1``
adds the traceback. Commands print their result on stdout and everything else
(progress, notes) on stderr. This package must hold no logic of its own beyond
turning arguments into calls.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Sequence

import click

from tdapp import __version__
from tdapp.cli.attest import attest
from tdapp.cli.build import build, image, images, measure
from tdapp.cli.cas import cas, self_group
from tdapp.cli.dataset import dataset
from tdapp.cli.las import las
from tdapp.cli.pool import submit, task, worker
from tdapp.cli.receipt import receipt
from tdapp.cli.result import result
from tdapp.cli.session import session
from tdapp.cli.transfer import transfer
from tdapp.cli.up import up
from tdapp.cli.volume import volume
from tdapp.cli.workflow import decrypt, encryptedpush
from tdapp.cli.workflow import run as run_command
from tdapp.errors import ExitCode, TdappError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tdapp")
@click.option("--traceback", "traceback", is_flag=True,
              help="Show a traceback when a command fails (or set TDAPP_DEBUG=1).")
# The older spelling; hidden because "debug" names a CAS mode (tdapp cas serve --debug).
@click.option("--debug", "old_traceback", is_flag=True, hidden=True)
def cli(traceback: bool, old_traceback: bool) -> None:
    """Run trusted DApps: encrypted volumes, attestation, key release."""
    if traceback or old_traceback:
        os.environ["TDAPP_DEBUG"] = "1"


cli.add_command(volume)
cli.add_command(cas)
cli.add_command(build)
cli.add_command(measure)
cli.add_command(images)
cli.add_command(image)
cli.add_command(encryptedpush)
cli.add_command(run_command)
cli.add_command(transfer)
cli.add_command(decrypt)
cli.add_command(up)
cli.add_command(las)
cli.add_command(session)
cli.add_command(self_group)
cli.add_command(attest)
cli.add_command(dataset)
cli.add_command(submit)
cli.add_command(task)
cli.add_command(worker)
cli.add_command(receipt)
cli.add_command(result)


def _fail(message: str, code: int) -> int:
    if os.environ.get("TDAPP_DEBUG") == "1" and sys.exc_info()[0] is not None:
        traceback.print_exc()
    click.echo(f"tdapp: error: {message}", err=True)
    return code


def run(args: Sequence[str] | None = None) -> int:
    """Run the CLI and return its exit code, never raising."""
    try:
        result = cli.main(args=list(args) if args is not None else None,
                          prog_name="tdapp", standalone_mode=False)
    except TdappError as error:
        return _fail(error.message, error.exit_code)
    except click.exceptions.NoArgsIsHelpError as error:
        click.echo(error.format_message(), err=True)
        return ExitCode.USAGE
    except click.UsageError as error:
        hint = f" (see '{error.ctx.command_path} --help')" if error.ctx else ""
        return _fail(f"{error.format_message()}{hint}", ExitCode.USAGE)
    except click.ClickException as error:
        return _fail(error.format_message(), ExitCode.USAGE)
    except (click.exceptions.Abort, KeyboardInterrupt):
        return _fail("interrupted", ExitCode.INTERRUPTED)
    except click.exceptions.Exit as exit_:
        return exit_.exit_code
    except OSError as error:
        where = f": {error.filename}" if error.filename else ""
        return _fail(f"{error.strerror or error}{where}", ExitCode.INPUT)
    except Exception as error:
        return _fail(
            f"internal error: {type(error).__name__}: {error} "
            "(run 'tdapp --traceback …' for details)",
            ExitCode.INTERNAL,
        )
    return result if isinstance(result, int) else ExitCode.OK


def main() -> None:
    sys.exit(run())

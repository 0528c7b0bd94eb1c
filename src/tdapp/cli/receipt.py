"""``tdapp receipt verify``: check a run's receipt offline, against the pinned CAS key."""

from __future__ import annotations

import json
from pathlib import Path

import click

from tdapp.errors import InputError


@click.group()
def receipt() -> None:
    """Receipts: the CAS's signed statements of what ran on what."""


@receipt.command()
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--bundle", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="The output bundle the receipt must be for.")
@click.option("--session", default=None, help="The session the receipt must be for.")
@click.option("--key", "key_file", type=click.Path(path_type=Path, dir_okay=False),
              default=None, help="A receipt key (public JWK) to check against, instead of the "
                                 "keys of the CASes this user pinned.")
@click.option("--json", "as_json", is_flag=True, help="Print the receipt's statement as JSON.")
def verify(file: Path, bundle: Path | None, session: str | None, key_file: Path | None,
           as_json: bool) -> None:
    """Check FILE offline: signed by a pinned CAS receipt key, for BUNDLE and SESSION if given.

    Exits 0 only if it is genuine; prints who produced what.
    """
    from tdapp.attest.receipt import public_key_from_json, thumbprint
    from tdapp.client.receipts import check_receipt

    text = _read(file, "receipt")
    keys = None
    if key_file is not None:
        try:
            key = public_key_from_json(json.loads(_read(key_file, "receipt key")))
        except ValueError:
            raise InputError(f"{key_file} is not a JWK (JSON)") from None
        keys = {thumbprint(key): key}
    stated = check_receipt(text, keys=keys, bundle=bundle, session=session)
    if as_json:
        click.echo(stated.model_dump_json(indent=2))
        return
    click.echo(f"receipt verified: {stated.describe()}")
    for volume, move in sorted(stated.outputs.items()):
        click.echo(f"output {volume}: {move.old} -> {move.new}")
    for volume, tag in sorted(stated.inputs.items()):
        click.echo(f"input {volume}: {tag}")
    click.echo(f"bundle sha256 {stated.bundle_sha256}")


def _read(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{what} {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"cannot read {what} {path}: {error}") from None

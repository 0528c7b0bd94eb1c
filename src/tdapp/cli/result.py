"""``tdapp result …``: iExec results: beneficiary keys, encryption, digests, enclave signatures.

Argument parsing only; the formats are tdapp.iexec's (docs/iexec.md).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import click

from tdapp.core.progress import counted
from tdapp.errors import InputError, UsageError

PRIVATE_NAME = "beneficiary.key"
PUBLIC_NAME = "beneficiary.key.pub"
_T = TypeVar("_T")


def _argument(option: str, parse: Callable[[str], _T], value: str) -> _T:
    # A malformed flag is a usage error naming the flag, not the library's field name.
    try:
        return parse(value)
    except InputError as error:
        raise UsageError(f"{option}: {error.message}") from None


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise InputError(f"{what} {path} is a folder, not a file") from None


@click.group()
def result() -> None:
    """iExec results: beneficiary keys, encryption, digests and enclave signatures."""


@result.command()
@click.option("-o", "--output", "folder", type=click.Path(path_type=Path, file_okay=False),
              default=Path("."), show_default=True, help="The folder for the two key files.")
def keygen(folder: Path) -> None:
    """Make a beneficiary key pair: beneficiary.key (0600) and beneficiary.key.pub.

    RSA-4096 in the PEM forms iexec-sdk writes; neither file is ever overwritten.
    """
    from tdapp.core.atomic import WriteMode, write_atomically
    from tdapp.iexec.result import generate_beneficiary_key

    private_path, public_path = folder / PRIVATE_NAME, folder / PUBLIC_NAME
    for path in (private_path, public_path):
        if path.exists() or path.is_symlink():
            raise InputError(f"{path} exists; remove it or give another -o")
    folder.mkdir(parents=True, exist_ok=True)
    private_pem, public_pem = generate_beneficiary_key()
    try:
        write_atomically(private_path, private_pem, mode=WriteMode.CREATE_ONLY,
                         permissions=0o600)
        write_atomically(public_path, public_pem, mode=WriteMode.CREATE_ONLY)
    except FileExistsError as error:
        raise InputError(f"{error.filename or folder} appeared meanwhile; not overwritten") \
            from None
    click.echo(f"private {private_path}\npublic {public_path}")


@result.command()
@click.argument("folder", type=click.Path(path_type=Path, file_okay=False))
@click.option("--public-key", type=click.Path(path_type=Path, dir_okay=False), required=True,
              help="The beneficiary's public key (PEM, or base64 of the PEM).")
@click.option("-o", "--output", "output", type=click.Path(path_type=Path, dir_okay=False),
              required=True, help="The encrypted result (a zip); never overwritten.")
def encrypt(folder: Path, public_key: Path, output: Path) -> None:
    """Zip FOLDER as iExec zips iexec_out and encrypt it for the beneficiary."""
    from tdapp.core.atomic import WriteMode, write_atomically
    from tdapp.iexec.result import encrypt_result, load_public_key, pack_result

    pem = _read(public_key, "public key")
    load_public_key(pem)  # a wrong key file is reported before the folder is read
    if output.exists() or output.is_symlink():
        raise InputError(f"{output} exists; remove it or give another -o")
    blob = encrypt_result(pack_result(folder), pem)
    try:
        write_atomically(output, blob, mode=WriteMode.CREATE_ONLY)
    except FileExistsError:
        raise InputError(f"{output} exists; remove it or give another -o") from None
    click.echo(f"encrypted {folder} into {output}", err=True)


@result.command()
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--key", "key", type=click.Path(path_type=Path, dir_okay=False), required=True,
              help="The beneficiary's private key (PEM).")
@click.option("-o", "--output", "output", type=click.Path(path_type=Path, file_okay=False),
              required=True, help="The folder to unpack into: new, or empty.")
def decrypt(file: Path, key: Path, output: Path) -> None:
    """Decrypt the iExec result FILE (current or 2020 format) and unpack it into OUTPUT."""
    from tdapp.iexec.result import decrypt_result, unpack_result

    private_pem = _read(key, "private key")
    inner = decrypt_result(_read(file, "result"), private_pem)
    names = unpack_result(inner, output)
    click.echo(f"decrypted {file}: {counted(len(names), 'file')} into {output}", err=True)


@result.command()
@click.argument("path", type=click.Path(path_type=Path), required=False)
@click.option("--callback", default=None, metavar="HEX",
              help="The callback-data (web3 mode) instead of an output PATH.")
def digest(path: Path | None, callback: str | None) -> None:
    """Print the result digest of PATH (a file or a folder of files) or of --callback."""
    from tdapp.iexec.digest import callback_digest, to_hex, web2_result_digest

    if (path is None) == (callback is None):
        raise UsageError("give either PATH or --callback HEX")
    if callback is not None:
        click.echo(to_hex(_argument("--callback", callback_digest, callback)))
    else:
        assert path is not None
        click.echo(to_hex(web2_result_digest(path)))


@result.command()
@click.option("--task-id", required=True, metavar="0x…", help="The task id (32 bytes).")
@click.option("--worker", required=True, metavar="0x…", help="The worker's address.")
@click.option("--digest", "result_digest", required=True, metavar="0x…",
              help="The result digest (32 bytes).")
@click.option("--signature", required=True, metavar="0x…",
              help="The enclave signature (65 bytes).")
@click.option("--address", required=True, metavar="0x…",
              help="The enclave challenge address the signature must come from.")
def verify(task_id: str, worker: str, result_digest: str, signature: str,
           address: str) -> None:
    """Check an enclave signature as PoCo does; exit 0 only if ADDRESS made it."""
    from tdapp.iexec import digest as formulas

    task = _argument("--task-id", lambda text: formulas.parse_bytes32(text, "task id"), task_id)
    who = _argument("--worker", formulas.parse_address, worker)
    value = _argument("--digest", lambda text: formulas.parse_bytes32(text, "digest"),
                      result_digest)
    signed = _argument("--signature", formulas.parse_signature, signature)
    expected = _argument("--address", lambda text: formulas.parse_address(text, "address"),
                         address)
    signer = formulas.check_signer(task, who, value, signed, expected)
    click.echo(f"signature verified: signed by {signer}")

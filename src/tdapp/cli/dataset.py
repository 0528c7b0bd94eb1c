"""``tdapp dataset push``: a data owner's folder, sealed as one volume in a session of its own.

``tdapp dataset encrypt|decrypt``: one file in iExec's dataset format (tdapp.iexec.dataset).
"""

from __future__ import annotations

from pathlib import Path

import click

from tdapp.cli.options import cas_option
from tdapp.client.announce import announced
from tdapp.core.address import Address
from tdapp.errors import InputError, UsageError


@click.group()
def dataset() -> None:
    """Datasets: a volume in a session of its own (push), or one file in iExec's format."""


@dataset.command()
@click.argument("inputs", type=click.Path(path_type=Path, file_okay=False))
@click.option("--volume", "volume_name", default="dataset", show_default=True,
              help="The volume's name (an importing session mounts it under this name).")
@click.option("--export-to", "exports", multiple=True, metavar="SESSION[@HASH]",
              help="A session that may import the volume (pinned to its hash with @HASH); "
                   "repeatable. Add one later with tdapp session export.")
@click.option("--conf", type=click.Path(path_type=Path, file_okay=False), default=Path("KEYS"),
              show_default=True, help="Where the volume's key is kept (KEYS/datasets/).")
@cas_option
@click.option("--push", default=None, metavar="URL",
              help="Upload URL (default: the transfer service tdapp up announced).")
def push(inputs: Path, volume_name: str, exports: tuple[str, ...], conf: Path,
         cas_address: str | None, push: str | None) -> None:
    """Seal INPUTS, create its session, upload; print the session, its hash and the URL."""
    from tdapp.client.sharing import ExportTo, push_dataset

    result = push_dataset(inputs=inputs, volume=volume_name, conf=conf,
                          cas=Address.parse(announced("cas", cas_address, "--cas")),
                          push=announced("push", push, "--push"),
                          exports=tuple(ExportTo.parse(text) for text in exports))
    click.echo(f"session {result.session}\nhash {result.hash}\nvolume {result.volume}\n"
               f"url {result.url}")
    click.echo(f"the volume's key is kept in {result.keys_file}", err=True)


def _create_only_key(path: Path, text: str) -> None:
    from tdapp.core.atomic import WriteMode, write_atomically

    try:
        write_atomically(path, text.encode("ascii"), mode=WriteMode.CREATE_ONLY,
                         permissions=0o600)
    except FileExistsError:
        raise InputError(f"{path} exists; remove it or give another --key-file") from None


def _refuse_existing(path: Path, option: str) -> None:
    if path.exists() or path.is_symlink():
        raise InputError(f"{path} exists; remove it or give another {option}")


@dataset.command()
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False))
@click.option("-o", "--output", "output", type=click.Path(path_type=Path, dir_okay=False),
              default=None, help="The encrypted file (default: FILE.enc).")
@click.option("--key-file", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Where the new key (base64) is written, 0600, never overwritten "
                   "(default: OUTPUT.key).")
def encrypt(file: Path, output: Path | None, key_file: Path | None) -> None:
    """Encrypt FILE as an iExec dataset with a new key; print its checksum.

    The file is IV ‖ AES-256-CBC, what iExec's pre-compute enclave opens; the
    checksum (0x + sha256 of the encrypted file) is the dataset's on-chain one.
    """
    from tdapp.iexec.dataset import encrypt_dataset_file, generate_dataset_key

    if not file.is_file():
        raise InputError(f"{file} is not a file")
    output = output or file.with_name(file.name + ".enc")
    key_file = key_file or output.with_name(output.name + ".key")
    _refuse_existing(output, "-o")
    key = generate_dataset_key()
    # The key first: an encrypted file whose key was lost would be worthless.
    _create_only_key(key_file, key.b64())
    try:
        checksum = encrypt_dataset_file(file, output, key)
    except FileExistsError:
        key_file.unlink()
        raise InputError(f"{output} exists; remove it or give another -o") from None
    except BaseException:
        key_file.unlink()
        raise
    click.echo(f"checksum {checksum}")
    click.echo(f"encrypted {file} into {output}; the key is in {key_file}", err=True)


@dataset.command()
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--key-file", type=click.Path(path_type=Path, dir_okay=False), required=True,
              help="The dataset key: a file holding its base64 text.")
@click.option("-o", "--output", "output", type=click.Path(path_type=Path, dir_okay=False),
              default=None, help="The plaintext (default: FILE without .enc, else FILE.dec); "
                                 "written 0600, never overwritten.")
@click.option("--checksum", default=None, metavar="0x…",
              help="The dataset's registered checksum; the file must have it.")
def decrypt(file: Path, key_file: Path, output: Path | None, checksum: str | None) -> None:
    """Decrypt the iExec dataset FILE with the key in KEY_FILE."""
    from tdapp.iexec.dataset import DatasetKey, decrypt_dataset_file, parse_checksum

    if checksum is not None:
        try:
            parse_checksum(checksum)
        except InputError as error:
            raise UsageError(f"--checksum: {error.message}") from None
    try:
        key = DatasetKey.from_b64(key_file.read_text(encoding="ascii"))
    except FileNotFoundError:
        raise InputError(f"key file {key_file} does not exist") from None
    except (OSError, UnicodeDecodeError):
        raise InputError(f"cannot read key file {key_file}") from None
    except InputError as error:
        raise InputError(f"{key_file}: {error.message}") from None
    if output is None:
        output = (file.with_name(file.name[:-len(".enc")]) if file.name.endswith(".enc")
                  and len(file.name) > len(".enc") else file.with_name(file.name + ".dec"))
    _refuse_existing(output, "-o")
    try:
        decrypt_dataset_file(file, output, key, checksum=checksum)
    except FileExistsError:
        raise InputError(f"{output} exists; remove it or give another -o") from None
    click.echo(f"decrypted {file} into {output}", err=True)

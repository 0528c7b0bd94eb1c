"""``tdapp encryptedpush``, ``tdapp run`` and ``tdapp decrypt``: the seed's walkthrough."""

from __future__ import annotations

import json
import re
from pathlib import Path

import click

from tdapp.cli.options import cas_option, complete_image, run_target, template_variables_from
from tdapp.client.announce import announced
from tdapp.core.address import Address
from tdapp.core.progress import counted
from tdapp.errors import UsageError


@click.command(context_settings={"ignore_unknown_options": False})
@click.option("--application", "-a", required=True, metavar="IMAGE",
              help="The DApp's image (as built by tdapp build).")
@click.option("--template", "-t", required=True, type=click.Path(path_type=Path, dir_okay=False),
              help="The session template (from tdapp build -o).")
@click.option("--conf", type=click.Path(path_type=Path, file_okay=False), default=Path("KEYS"),
              show_default=True, help="Where keys and session state are kept (mode 0600).")
@click.option("--inputs", type=click.Path(path_type=Path, file_okay=False),
              default=Path("INPUTS"), show_default=True, help="The files to encrypt and push.")
@cas_option
@click.option("--push", default=None, metavar="URL",
              help="Upload URL (default: the transfer service tdapp up announced).")
@click.option("--las", "las_address", default=None, metavar="HOST:PORT",
              help="The LAS whose platform fills a template's $LAS_PLATFORM (default: the "
                   "one tdapp up announced, else 127.0.0.1:18766).")
@click.option("--export-to", "exports", multiple=True, metavar="SESSION[@HASH]",
              help="Export the input volume to this session (read-only there; @HASH pins its "
                   "hash); repeatable (docs/secrets.md).")
@click.option("--session", "session_name", default=None, metavar="NAME",
              help="Name the session (fills $SESSION; default: a fresh tdapp-… name). A "
                   "template that writes its own name: keeps it.")
@click.option("-e", "--env", "assignments", multiple=True, metavar="VAR=VALUE",
              help="Fill $VAR in the template (also taken from the environment).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
def encryptedpush(application: str, template: Path, conf: Path, inputs: Path,
                  cas_address: str | None, push: str | None, las_address: str | None,
                  exports: tuple[str, ...], session_name: str | None,
                  assignments: tuple[str, ...], as_json: bool) -> None:
    """Encrypt INPUTS, create the session, upload; print the arguments for tdapp run."""
    from tdapp.client.sharing import ExportTo
    from tdapp.client.workflow import encrypted_push

    result = encrypted_push(
        application=application, template=template, conf=conf, inputs=inputs,
        cas=Address.parse(announced("cas", cas_address, "--cas")),
        push=announced("push", push, "--push"),
        variables=template_variables_from(assignments), las=las_address,
        exports=tuple(ExportTo.parse(text) for text in exports), session=session_name)
    if as_json:
        click.echo(json.dumps({"session": result.session, "cas": result.cas,
                               "url": result.url, "arguments": result.command_line.split()}))
        return
    click.echo(result.command_line)


def _fetched(encrypted: str, work: Path) -> Path:
    """A local path as it is; a URL (kept whole, never read as a path) downloaded to ``work``."""
    if not _URL.match(encrypted):
        return Path(encrypted)
    from tdapp.transfer import download

    target = work / "encrypted.zip"
    download(encrypted, target)
    return target


_URL = re.compile(r"^(https?|s3)://", re.IGNORECASE)


@click.command()
@click.option("--conf", type=click.Path(path_type=Path, file_okay=False), default=Path("KEYS"),
              show_default=True)
@click.option("--encrypted", default="ZIP", show_default=True, metavar="PATH|URL",
              help="The output zip, a folder holding exactly one, or its URL (http, https, "
                   "s3: as tdapp run printed it; downloaded first).")
@click.option("--out", type=click.Path(path_type=Path, file_okay=False), default=Path("OUTPUTS"),
              show_default=True, help="Where the plaintext files are written.")
@click.option("--session", "session_name", default=None, metavar="NAME",
              help="The session in KEYS whose keys to use (default: the one whose output "
                   "key opens the bundle).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
@click.option("--key", "key_file", default=None, metavar="FILE",
              type=click.Path(path_type=Path, dir_okay=False),
              help="Use only this output key file (KEYS/output-keys/SESSION.json, as "
                   "encryptedpush writes it); KEYS is not read.")
def decrypt(conf: Path, encrypted: str, out: Path, session_name: str | None,
            key_file: Path | None, as_json: bool) -> None:
    """Verify the DApp's output against the CAS's current tag and decrypt it into OUTPUTS."""
    import tempfile

    from tdapp.client.workflow import decrypt as run_decrypt

    if key_file is not None and session_name is not None:
        raise UsageError("give --key or --session, not both")
    with tempfile.TemporaryDirectory(prefix="tdapp-fetch-") as work:
        bundle = _fetched(encrypted, Path(work))
        result = run_decrypt(conf=conf, encrypted=bundle, out=out, session=session_name,
                             key_file=key_file)
    if as_json:
        click.echo(json.dumps({"files": result.files, "session": result.session,
                               "state_file": str(result.state_file), "out": str(out),
                               "receipt": None if result.receipt is None
                               else result.receipt.model_dump(mode="json")}))
    click.echo(f"decrypted {counted(result.files, 'file')} of session {result.session} "
               f"({result.state_file}) into {out}", err=True)
    if result.receipt is None:
        click.echo("no receipt: the CAS keeps none for this bundle (a run before receipts)",
                   err=True)
    else:
        click.echo(f"produced by {result.receipt.describe()}; receipt verified", err=True)


@click.command()
@click.argument("image", shell_complete=complete_image)
@run_target
@click.option("--url", "urls", required=True, multiple=True,
              help="Where to download the encrypted input bundle; repeat it to take volumes "
                   "from several bundles (another party's dataset, say).")
@click.option("--push", default=None, metavar="URL", help="Where to upload the output bundle.")
@click.option("--las", "las_address", default=None, metavar="HOST:PORT",
              help="The local attestation service (default: the announced one).")
@click.option("--tee", type=click.Choice(("auto", "sim", "tsm", "gramine")), default="auto",
              show_default=True,
              help="Where evidence comes from: auto uses a TEE it finds (configfs-tsm in a "
                   "TDX or SNP guest, Gramine's /dev/attestation in SGX), else the LAS if the "
                   "session accepts sim.")
@click.option("--shield", type=click.Choice(("auto", "fuse", "tmpfs")), default="auto",
              show_default=True,
              help="How the program sees its volumes: fuse decrypts as it reads (volumes larger "
                   "than memory), tmpfs decrypts them whole into memory first; auto takes fuse "
                   "for volumes over 64 MiB when /dev/fuse is usable.")
@click.option("--iexec-worker", "iexec_worker", default=None, metavar="ADDRESS",
              help="For an iExec task: the worker address its result seal names (default "
                   "the zero address).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
@click.option("--receipt", "receipt", type=click.Path(path_type=Path, dir_okay=False),
              default=Path("receipt.jws"), show_default=True,
              help="Where to write the run's receipt, the CAS's signed statement of what ran "
                   "on what (check it: tdapp receipt verify FILE --bundle BUNDLE).")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True, max=1e9), default=3600.0,
              show_default=True, metavar="SECONDS",
              help="Kill the program past this time; the run then fails with exit code 9, "
                   "moving no tag and uploading nothing.")
def run(image: str, session_id: str, cas_address: str, urls: tuple[str, ...],
        push: str | None,
        las_address: str | None, tee: str, shield: str, timeout: float,
        receipt: Path, iexec_worker: str | None, as_json: bool) -> None:
    """Run IMAGE as a trusted DApp; prints only the URL of its encrypted outputs."""
    from tdapp.runtime.iexec_post import worker_address
    from tdapp.runtime.mounts import ShieldKind
    from tdapp.runtime.run import RunRequest, run_dapp

    result = run_dapp(RunRequest(image=image, session_id=session_id,
                                 cas=Address.parse(cas_address), url=urls[0],
                                 more_urls=urls[1:],
                                 push=announced("push", push, "--push"),
                                 las=announced("las", las_address, "--las"), tee=tee,
                                 shield=ShieldKind(shield), timeout=timeout,
                                 receipt=receipt,
                                 iexec_worker=worker_address(iexec_worker)),
                      log=lambda line: click.echo(f"tdapp run: {line}", err=True))
    if as_json:
        click.echo(json.dumps({"url": result, "receipt": str(receipt)}))
        return
    click.echo(result)

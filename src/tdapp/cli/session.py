"""``tdapp session …``: sessions on a CAS (create, update, read, push new inputs, list, tags,
history, export, delete, hash, check).

``read`` prints the session as the next update's draft: its volumes' current
tags (as the CAS holds them now, not as the document last stated them) and
exactly one ``predecessor:``, the current hash, so that read, edit, update
works and never asks the CAS to move a tag back.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import click
from rich.table import Table

from tdapp.cli.options import cas_option, complete_session, table_console, template_variables_from
from tdapp.client.announce import announced
from tdapp.client.cas_client import CasClient
from tdapp.client.identity import ClientIdentity
from tdapp.core.address import Address
from tdapp.errors import InputError, IntegrityError, UnavailableError, UsageError
from tdapp.policy import fill_template, parse_session, session_hash
from tdapp.policy.emit import dump_yaml
from tdapp.policy.enforced import parse_enforceable_session
from tdapp.policy.model import Session
from tdapp.policy.modes import with_fixed_mode
from tdapp.policy.security import AttestationMode


def _cas(address: str | None) -> Address:
    return Address.parse(announced("cas", address, "--cas"))
_env_option = click.option("-e", "--env", "assignments", multiple=True, metavar="VAR=VALUE",
                           help="Fill $VAR in the template (also taken from the environment).")


def _document(path: Path, assignments: tuple[str, ...]) -> tuple[str, Session]:
    """FILE filled in, and the session it is; refused here, with the line, before
    anything is sent, if it is not valid or not enforceable."""
    try:
        template = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"cannot read session file {path}: {error}") from None
    text = fill_template(template, template_variables_from(assignments))
    return text, parse_enforceable_session(text, source=str(path))


@click.group()
def session() -> None:
    """Sessions (security policies) on a CAS."""


@session.command()
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False, exists=True))
@_env_option
def check(file: Path, assignments: tuple[str, ...]) -> None:
    """Check FILE without a CAS: valid, and every key in it one tdapp enforces.

    Prints the session's name; a key the CAS would refuse is named with its line.
    """
    _, document = _document(file, assignments)
    click.echo(f"{file}: session {document.name} is valid and enforceable")


@session.command()
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False, exists=True))
@_env_option
@cas_option
def create(file: Path, assignments: tuple[str, ...], cas_address: str | None) -> None:
    """Create the session in FILE (a template: $VARS are filled); prints its hash."""
    text, _ = _document(file, assignments)
    answer = CasClient.connect(_cas(cas_address)).request(
        "POST", "/v1/sessions", text.encode())
    click.echo(answer["hash"])


@session.command()
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False, exists=True))
@_env_option
@cas_option
def update(file: Path, assignments: tuple[str, ...], cas_address: str | None) -> None:
    """Replace a session; FILE must name the current hash as predecessor. Prints the new hash."""
    text, document = _document(file, assignments)
    name = document.name
    answer = CasClient.connect(_cas(cas_address)).request(
        "PUT", f"/v1/sessions/{quote(name, safe='/')}", text.encode())
    _note_made_anew(document)
    click.echo(answer["hash"])


def _note_made_anew(document: Session) -> None:
    """Say which secrets an update made new values for: an update keeps a made value only
    where the secret says ``migrate: true`` (docs/secrets.md)."""
    fresh = [secret.name for secret in document.secrets
             if secret.import_ is None and secret.value is None and not secret.migrate
             and secret.kind in ("ascii", "binary", "private-key", "x509", "x509-ca",
                                 "session-ca")]
    if fresh:
        click.echo(f"tdapp: note: the CAS made new values for secret{'s' * (len(fresh) > 1)} "
                   f"{', '.join(fresh)} (an update keeps a made value only with migrate: true)",
                   err=True)


@session.command()
@click.argument("name", shell_complete=complete_session)
@click.option("--public", "public", default=None, metavar="SECRET",
              help="Print only the public part of this export_public secret (a certificate, "
                   "a public key) instead of the session.")
@click.option("--challenge", "challenge", default=None, metavar="SERVICE",
              help="Print only the enclave challenge address of this iExec task's service "
                   "(its results are signed by that address).")
@cas_option
def read(name: str, public: str | None, challenge: str | None,
         cas_address: str | None) -> None:
    """Print a session as it stands now, ready to edit and update (readers only)."""
    client = CasClient.connect(_cas(cas_address))
    answer = client.request("GET", f"/v1/sessions/{quote(name, safe='/')}")
    if challenge is not None:
        challenges = answer.get("enclave_challenges")
        address = challenges.get(challenge) if isinstance(challenges, dict) else None
        if not isinstance(address, str):
            raise InputError(f"service {challenge!r} of session {name!r} is not an iExec task "
                             "(its environment names no IEXEC_TASK_ID)")
        click.echo(address)
        return
    if public is not None:
        shown = answer.get("public_secrets")
        value = shown.get(public) if isinstance(shown, dict) else None
        if not isinstance(value, str):
            raise InputError(f"session {name!r} has no export_public secret {public!r}")
        click.echo(value.rstrip("\n"))
        return
    document, digest, creator = (answer.get(key) for key in ("session", "hash", "creator"))
    if not (isinstance(document, str) and isinstance(digest, str) and isinstance(creator, str)):
        raise UnavailableError(f"the CAS at {_cas(cas_address)} answered without a session "
                               "document, hash and creator")
    click.echo(_update_draft(client, name, document, digest, creator).rstrip("\n"))


def _update_draft(client: CasClient, name: str, document: str, digest: str,
                  creator: str) -> str:
    """The stored document with its volumes' current tags and the current hash as
    its one predecessor."""
    stored = parse_session(document, source=f"session {name} as the CAS sent it")
    if session_hash(stored, creator) != digest:
        raise IntegrityError(f"the CAS sent a document for session {name!r} that does not "
                             f"hash to the hash it reported ({digest})")
    content = stored.to_canonical()
    for volume in content.get("volumes", []):
        if "fspf_tag" in volume:
            query = urlencode({"session": name, "volume": volume["name"]})
            tag = client.request("GET", f"/v1/volume-tags?{query}").get("tag")
            if isinstance(tag, str):
                volume["fspf_tag"] = tag
    content.pop("predecessor", None)
    draft: dict[str, Any] = {"name": content.pop("name"), "version": content.pop("version"),
                             "predecessor": digest, **content}
    text = dump_yaml(draft)
    parse_session(text, source=f"session {name} as read")  # prints only what update accepts
    return text


_item_options = [
    click.option("--secret", "secret", default=None, metavar="NAME",
                 help="The secret of the session to export."),
    click.option("--volume", "volume", default=None, metavar="NAME",
                 help="The volume of the session to export."),
]


def _item(secret: str | None, volume: str | None) -> tuple[str, str]:
    if (secret is None) == (volume is None):
        raise UsageError("name exactly one of --secret NAME or --volume NAME")
    return ("secrets", secret) if secret is not None else ("volumes", str(volume))


def _change_exports(client: CasClient, name: str,
                    edit: Callable[[dict[str, Any]], dict[str, Any]]) -> str:
    """Read the session, apply ``edit`` to its update draft, send the update; the new hash."""
    answer = client.request("GET", f"/v1/sessions/{quote(name, safe='/')}")
    document, digest, creator = (answer.get(key) for key in ("session", "hash", "creator"))
    if not (isinstance(document, str) and isinstance(digest, str) and isinstance(creator, str)):
        raise UnavailableError("the CAS answered without a session document, hash and creator")
    draft = parse_session(_update_draft(client, name, document, digest, creator))
    content = draft.to_canonical()
    text = dump_yaml(edit(content))
    edited = parse_enforceable_session(text, source=f"session {name} with the export changed")
    changed = client.request("PUT", f"/v1/sessions/{quote(name, safe='/')}", text.encode())
    _note_made_anew(edited)
    return str(changed["hash"])


@session.command()
@click.argument("name", shell_complete=complete_session)
@_item_options[0]
@_item_options[1]
@click.option("--to", "target", required=True, metavar="SESSION[@HASH]",
              help="The session that may import it; @HASH pins that session's hash, so a "
                   "changed importer gets nothing.")
@cas_option
def export(name: str, secret: str | None, volume: str | None, target: str,
           cas_address: str | None) -> None:
    """Export a secret or volume of session NAME to another session (an update of NAME)."""
    from tdapp.client.sharing import ExportTo, with_export

    section, item = _item(secret, volume)
    to = ExportTo.parse(target)
    client = CasClient.connect(_cas(cas_address))
    click.echo(_change_exports(client, name,
                               lambda content: with_export(content, section, item, to)))


@session.command()
@click.argument("name", shell_complete=complete_session)
@_item_options[0]
@_item_options[1]
@click.option("--to", "target", required=True, metavar="SESSION",
              help="The session whose export is removed: its next attestation gets nothing.")
@cas_option
def unexport(name: str, secret: str | None, volume: str | None, target: str,
             cas_address: str | None) -> None:
    """Remove an export of session NAME (an update of NAME); prints the new hash."""
    from tdapp.client.sharing import without_export

    section, item = _item(secret, volume)
    client = CasClient.connect(_cas(cas_address))
    click.echo(_change_exports(client, name,
                               lambda content: without_export(content, section, item, target)))


@session.command(name="list")
@cas_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object per session.")
def list_(cas_address: str | None, as_json: bool) -> None:
    """The sessions this identity created: name, namespace, mode, revision, times."""
    answer = CasClient.connect(_cas(cas_address)).request("GET", "/v1/sessions")
    listed = answer.get("sessions")
    if not isinstance(listed, list):
        raise UnavailableError("the CAS answered without a list of sessions")
    if as_json:
        for entry in listed:
            click.echo(json.dumps(entry))
        return
    table = Table(title=f"sessions of this identity ({len(listed)})")
    for header in ("session", "namespace", "mode", "revision", "created", "updated"):
        table.add_column(header)
    for entry in listed:
        name = str(entry.get("name", ""))
        table.add_row(name, name.rpartition("/")[0], str(entry.get("mode") or ""),
                      str(entry.get("revision", "")), _when(entry.get("created_at")),
                      _when(entry.get("updated_at")))
    table_console().print(table)


def _when(value: object) -> str:
    if not isinstance(value, int | float):
        return ""
    return datetime.fromtimestamp(value, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


@session.command()
@click.argument("name", shell_complete=complete_session)
@cas_option
@click.option("--json", "as_json", is_flag=True, help="{volume: tag} as one JSON object.")
def tags(name: str, cas_address: str | None, as_json: bool) -> None:
    """The current tag of each of the session's volumes, as the CAS holds it (readers only)."""
    client = CasClient.connect(_cas(cas_address))
    answer = client.request("GET", f"/v1/sessions/{quote(name, safe='/')}")
    stored = parse_session(str(answer.get("session", "")), source=f"session {name}")
    current: dict[str, str | None] = {}
    for volume in stored.volumes:
        if volume.import_ is not None:
            continue  # its tag is the exporter's
        query = urlencode({"session": name, "volume": volume.name})
        tag = client.request("GET", f"/v1/volume-tags?{query}").get("tag")
        current[volume.name] = tag if isinstance(tag, str) else None
    if as_json:
        click.echo(json.dumps(current))
        return
    for volume_name, tag in current.items():
        click.echo(f"{volume_name} {tag or '(none)'}")


@session.command()
@click.argument("name", shell_complete=complete_session)
@cas_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object per event.")
def history(name: str, cas_address: str | None, as_json: bool) -> None:
    """Everything the CAS decided about the session, oldest first (readers only): creation,
    updates, attestations accepted or refused with the reason, tag moves, exports."""
    answer = CasClient.connect(_cas(cas_address)).request(
        "GET", f"/v1/audit?{urlencode({'session': name})}")
    events = answer.get("events")
    if not isinstance(events, list):
        raise UnavailableError("the CAS answered without the session's events")
    if as_json:
        for event in events:
            click.echo(json.dumps(event))
        return
    table = Table(title=f"history of session {name} ({len(events)} events)")
    for header in ("at", "event", "outcome", "actor", "reason"):
        table.add_column(header, overflow="fold")
    for event in events:
        actor = str(event.get("actor") or "")
        table.add_row(_when(event.get("at")), str(event.get("event", "")),
                      str(event.get("outcome", "")), actor[:16], str(event.get("reason", "")))
    table_console().print(table)


@session.command()
@click.argument("name", shell_complete=complete_session)
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@cas_option
def delete(name: str, yes: bool, cas_address: str | None) -> None:
    """Delete session NAME (access_policy.update): its keys, secrets and tags are gone for good;
    its audit log stays. Sessions importing from it are refused at their next attestation."""
    import sys

    if not yes:
        if not sys.stdin.isatty():
            raise UsageError(f"deleting session {name} loses its keys for good: confirm with "
                             "--yes")
        click.confirm(f"Delete session {name}? Its volume keys and secrets cannot be "
                      "recovered", abort=True, err=True)
    CasClient.connect(_cas(cas_address)).request("DELETE", f"/v1/sessions/{quote(name, safe='/')}")
    click.echo(f"deleted session {name}", err=True)


@session.command()
@click.argument("name", shell_complete=complete_session)
@click.option("--inputs", type=click.Path(path_type=Path, file_okay=False),
              default=Path("INPUTS"), show_default=True, help="The new input files.")
@click.option("--conf", type=click.Path(path_type=Path, file_okay=False), default=Path("KEYS"),
              show_default=True, help="The KEYS folder that holds the session's keys.")
@click.option("--push", default=None, metavar="URL",
              help="Upload URL (default: the transfer service tdapp up announced).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
def push(name: str, inputs: Path, conf: Path, push: str | None, as_json: bool) -> None:
    """Push new INPUTS into session NAME (made by tdapp encryptedpush with these KEYS) and
    print the arguments for tdapp run, as encryptedpush does.

    The same keys seal the new input volume and a fresh, empty output volume; the CAS moves
    both tags from the current ones at once (access_policy.update), so the same DApp runs on
    the new inputs and a bundle of the older ones is refused from then on. Decrypt the last
    run's output first: afterwards it is no longer the session's latest output.
    """
    from tdapp.client.workflow import push_into_session

    result = push_into_session(conf=conf, session=name, inputs=inputs,
                               push=announced("push", push, "--push"))
    if as_json:
        click.echo(json.dumps({"session": result.session, "cas": result.cas,
                               "url": result.url, "arguments": result.command_line.split()}))
        return
    click.echo(result.command_line)


@session.command(name="hash")
@click.argument("file_or_name")
@_env_option
@cas_option
def hash_(file_or_name: str, assignments: tuple[str, ...], cas_address: str | None) -> None:
    """Print a session's hash: of FILE as this user would create it, or of NAME on the CAS.

    A FILE that names no attestation mode gets the one the CAS would write into it
    (asked from the CAS), as the hash covers the mode.
    """
    path = Path(file_or_name)
    if path.is_file():
        _, document = _document(path, assignments)
        creator = ClientIdentity.load_or_create().identity
        click.echo(session_hash(_as_stored(document, cas_address), creator))
        return
    answer = CasClient.connect(_cas(cas_address)).request(
        "GET", f"/v1/sessions/{quote(file_or_name, safe='/')}")
    click.echo(answer["hash"])


def _as_stored(document: Session, cas_address: str | None) -> Session:
    """``document`` with the mode the CAS would fix in it (no CAS asked if it names one)."""
    attestation = document.security.attestation
    if attestation.mode is not None and (attestation.mode is not AttestationMode.SIM
                                         or attestation.platforms):
        return document
    client = CasClient.connect(_cas(cas_address))
    defaults = client.request("GET", "/v1/session-defaults")
    predecessor = None
    if document.predecessor is not None:
        stored = client.request("GET", f"/v1/sessions/{quote(document.name, safe='/')}")
        predecessor = parse_session(str(stored.get("session", "")),
                                    source=f"session {document.name} as the CAS sent it")
    try:
        mode = AttestationMode(str(defaults.get("mode")))
    except ValueError:
        raise UnavailableError("the CAS did not say which mode it gives sessions") from None
    platforms = defaults.get("platforms")
    if not isinstance(platforms, list):
        raise UnavailableError("the CAS did not say which LAS platforms it trusts")
    return with_fixed_mode(document, predecessor=predecessor, default=mode,
                           trusted_platforms=tuple(str(p) for p in platforms))

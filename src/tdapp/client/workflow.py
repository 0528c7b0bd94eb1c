"""The user's workflow around a DApp run: ``encryptedpush`` before it, ``decrypt`` after it.

``encryptedpush`` makes fresh volume keys, seals the inputs and an empty
output volume, creates the session on the CAS and uploads the volumes;
``decrypt`` verifies the output volume against the tag the CAS holds now and
writes the plaintext. ``push_into_session`` (``tdapp session push``) gives an
existing session new inputs and a fresh output volume under the same keys.
Where each session's keys are kept is :mod:`tdapp.client.session_files`.

``decrypt`` uses the session whose output key opens the bundle (or the one
named), and talks only to the CAS whose certificate fingerprint was recorded
at push time: a different certificate pinned for that address now is refused
before anything is sent to it. Nothing here may write keys anywhere but KEYS,
accept an output volume that is not the latest, or lose a stored session.
"""

from __future__ import annotations

import hmac
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from cryptography import x509

from tdapp.attest.receipt import Receipt
from tdapp.client.cas_client import CasClient
from tdapp.client.identity import ClientIdentity
from tdapp.client.pins import PinStore
from tdapp.client.receipts import check_receipt_states, receipt_of_bundle
from tdapp.client.session_files import (
    INPUT_VOLUME,
    OUTPUT_VOLUME,
    SERVICE,
    KeysFolder,
    SessionState,
    load_state_file,
)
from tdapp.client.sharing import ExportTo, with_export, write_output_key
from tdapp.core.address import Address
from tdapp.core.progress import byte_progress
from tdapp.errors import InputError, RefusedError, TdappError, UnavailableError, WrongKeyError
from tdapp.policy import fill_template
from tdapp.policy.emit import dump_yaml
from tdapp.policy.enforced import parse_enforceable_session
from tdapp.policy.template import LAS_PLATFORM_VARIABLE, template_variables
from tdapp.tls import fingerprint
from tdapp.volume import Volume, VolumeKey, VolumeTag
from tdapp.volume.bundle import find_bundle, pack, unpack
from tdapp.volume.fspf import open_fspf, read_tag
from tdapp.volume.layout import VolumeFolder


@dataclass(frozen=True)
class PushResult:
    session: str
    cas: str
    url: str

    @property
    def command_line(self) -> str:
        return (f"--sessionID {self.session}/{SERVICE} --secretManagementService {self.cas} "
                f"--url {self.url}")


@dataclass(frozen=True)
class DecryptResult:
    files: int
    session: str
    state_file: Path
    receipt: Receipt | None  # None: the CAS keeps no receipt for this bundle


def encrypted_push(*, application: str, template: Path, conf: Path, inputs: Path,
                   cas: Address, push: str, variables: dict[str, str],
                   las: str | None = None, exports: tuple[ExportTo, ...] = (),
                   session: str | None = None) -> PushResult:
    from tdapp.transfer import upload

    _require_folder(inputs, "inputs folder")
    template_text = _read_template(template)
    variables = _with_las_platform(template_text, variables, las)
    # Everything that could stop the keys from being kept is checked before the
    # CAS learns of the session: a session nobody holds the keys of is lost work.
    keys_folder = KeysFolder(conf)
    keys_folder.prepare_for_push()
    session_name = session or f"tdapp-{secrets.token_hex(16)}"
    with tempfile.TemporaryDirectory(prefix="tdapp-push-") as work:
        root = Path(work)
        keys = {INPUT_VOLUME: VolumeKey.generate(), OUTPUT_VOLUME: VolumeKey.generate()}
        made = _seal_volumes(root, keys, inputs)
        filled = fill_template(template_text, {
            **variables, "SESSION": session_name,
            "INPUT_FSPF_KEY": keys[INPUT_VOLUME].hex(),
            "INPUT_FSPF_TAG": made[INPUT_VOLUME].tag.hex(),
            "OUTPUT_FSPF_KEY": keys[OUTPUT_VOLUME].hex(),
            "OUTPUT_FSPF_TAG": made[OUTPUT_VOLUME].tag.hex(),
        })
        if exports:  # the input volume, shared with other sessions (read-only for them)
            content = parse_enforceable_session(filled, source=str(template)).to_canonical()
            for target in exports:
                with_export(content, "volumes", INPUT_VOLUME, target)
            filled = dump_yaml(content)
        # The session is the one the document names: a template may write its own name
        # instead of $SESSION, and the keys must be kept under the name the CAS stores.
        session_name = parse_enforceable_session(filled, source=str(template)).name
        keys_folder.check_new_name(session_name)
        client = CasClient.connect(cas)
        created = client.request("POST", "/v1/sessions", filled.encode())
        bundle = root / "scone-upload.zip"
        pack({name: root / name for name in made}, bundle)
        url = upload(bundle, push)
    state = {
        "session": session_name, "service": SERVICE, "application": application,
        "cas": str(cas), "cas_fingerprint": fingerprint(client.pinned),
        "session_hash": created.get("hash"), "url": url,
        "volumes": {name: {"key": keys[name].hex(), "tag": made[name].tag.hex()}
                    for name in made},
    }
    keys_folder.save(state)
    write_output_key(conf, state)
    return PushResult(session_name, str(cas), url)


def push_into_session(*, conf: Path, session: str, inputs: Path,
                      push: str) -> PushResult:
    """Replace the inputs of a session kept in ``conf`` and give it a fresh output volume.

    The same keys seal the new volumes (each write has a fresh salt, so no nonce
    repeats); the bundle is uploaded first, then the CAS moves both tags from the
    current ones in one compare-and-swap (:meth:`TagAuthority.replace_volumes`),
    so a failed upload changes nothing and a bundle of the older inputs is refused
    from then on. Only the CAS the session was pushed to is asked.
    """
    from tdapp.transfer import upload

    _require_folder(inputs, "inputs folder")
    keys_folder = KeysFolder(conf)
    state = keys_folder.named(session)
    document = state.document
    try:
        keys = {name: VolumeKey.from_hex(str(document["volumes"][name]["key"]))
                for name in (INPUT_VOLUME, OUTPUT_VOLUME)}
    except (KeyError, TypeError, TdappError):
        raise InputError(f"{state.path} holds no keys of the volumes {INPUT_VOLUME} and "
                         f"{OUTPUT_VOLUME}; only a session made by tdapp encryptedpush can "
                         "take new inputs") from None
    client = _client_for_recorded_cas(state)
    current = {name: _current_tag(client, state.name, name) for name in keys}
    with tempfile.TemporaryDirectory(prefix="tdapp-push-") as work:
        root = Path(work)
        made = _seal_volumes(root, keys, inputs)
        bundle = root / "scone-upload.zip"
        pack({name: root / name for name in made}, bundle)
        url = upload(bundle, push)
    client.request_json("POST", "/v1/volume-tags/replace", {
        "session": state.name,
        "moves": [{"volume": name, "old": current[name], "new": made[name].tag.hex()}
                  for name in made]})
    document = {**document, "url": url, "pushes": int(document.get("pushes", 1)) + 1,
                "volumes": {name: {**document["volumes"][name], "tag": made[name].tag.hex()}
                            for name in document["volumes"]}}
    keys_folder.replace(document)
    return PushResult(state.name, str(state.cas), url)


def _current_tag(client: CasClient, session: str, volume: str) -> str | None:
    answer = client.request(
        "GET", f"/v1/volume-tags?session={quote(session)}&volume={quote(volume)}")
    tag = answer.get("tag")
    return tag if isinstance(tag, str) else None


def _seal_volumes(root: Path, keys: dict[str, VolumeKey], inputs: Path) -> dict[str, Volume]:
    """The input volume of ``inputs`` and an empty output volume, under ``root``."""
    empty = root / "empty"
    empty.mkdir()
    with byte_progress("encrypting", _folder_bytes(inputs)) as progress:
        return {
            INPUT_VOLUME: Volume.create(root / INPUT_VOLUME, keys[INPUT_VOLUME],
                                        source=inputs, progress=progress),
            OUTPUT_VOLUME: Volume.create(root / OUTPUT_VOLUME, keys[OUTPUT_VOLUME],
                                         source=empty),
        }


def _require_folder(path: Path, what: str) -> None:
    if not path.is_dir():
        raise InputError(f"{what} {path} "
                         f"{'is not a folder' if path.exists() else 'does not exist'}")


def _folder_bytes(folder: Path) -> int | None:
    """The bytes of the regular files below ``folder`` (for a progress bar; None if unknown)."""
    try:
        return sum(path.stat().st_size for path in folder.rglob("*")
                   if path.is_file() and not path.is_symlink())
    except OSError:
        return None


def _with_las_platform(template_text: str, variables: dict[str, str],
                       las: str | None) -> dict[str, str]:
    """``variables`` with ``$LAS_PLATFORM`` (a sim template's platform), if the template
    uses it and it is not given: the platform id of this user's LAS, asked over loopback."""
    from tdapp.attest.las import LasClient
    from tdapp.client.announce import announced

    if (LAS_PLATFORM_VARIABLE not in template_variables(template_text)
            or LAS_PLATFORM_VARIABLE in variables):
        return variables
    address = announced("las", las, "--las")
    platform = LasClient(address).platform().get("platform")
    if not isinstance(platform, str):
        raise UnavailableError(f"the LAS at {address} did not say its platform id")
    return {**variables, LAS_PLATFORM_VARIABLE: platform}


def _read_template(template: Path) -> str:
    try:
        return template.read_text(encoding="utf-8")
    except IsADirectoryError:
        raise InputError(f"template {template} is a folder, not a file") from None
    except OSError as error:
        raise InputError(f"cannot read template {template}: {error.strerror}") from None
    except UnicodeDecodeError:
        raise InputError(f"template {template} is not UTF-8 text") from None


def decrypt(*, conf: Path, encrypted: Path, out: Path, session: str | None = None,
            key_file: Path | None = None) -> DecryptResult:
    """Verify the output volume against the CAS's current tag and extract it.

    With ``key_file`` (an output key file, or any session state file) only that
    session's output key is used, and KEYS is not read.
    """
    keys_folder = KeysFolder(conf)
    if key_file is not None:
        named: SessionState | None = load_state_file(key_file)
    else:
        named = keys_folder.named(session) if session is not None else None
    bundle = find_bundle(encrypted)
    with tempfile.TemporaryDirectory(prefix="tdapp-decrypt-") as work:
        volumes = unpack(bundle, Path(work), {OUTPUT_VOLUME})  # the inputs are not needed
        folder = volumes.get(OUTPUT_VOLUME)
        if folder is None:
            raise InputError(f"{bundle} holds no {OUTPUT_VOLUME} volume")
        fspf = VolumeFolder(folder).read_fspf()
        state = _session_for(fspf, bundle, named, keys_folder)
        client = _client_for_recorded_cas(state)
        current = _current_tag(client, state.name, OUTPUT_VOLUME)
        if current is None:
            raise InputError(f"the CAS holds no tag for {OUTPUT_VOLUME} of {state.name}")
        try:
            tag = VolumeTag.from_hex(current)
        except TdappError:
            raise InputError(f"the CAS sent a malformed tag for {state.name}") from None
        opened = Volume.open(folder, state.output_key, tag, name=OUTPUT_VOLUME)
        plaintext = sum(info.size for info in opened.files())
        # Who produced it: the CAS's signed receipt for exactly this bundle, stating this
        # output at the tag just checked (a receipt for anything else is refused).
        receipt = receipt_of_bundle(client, state.cas, state.name, bundle)
        if receipt is not None:
            check_receipt_states(receipt, OUTPUT_VOLUME, tag.hex())
        with byte_progress("decrypting", plaintext) as progress:
            report = opened.extract(out, progress=progress)
    return DecryptResult(report.files, state.name, state.path, receipt)


def _session_for(fspf: bytes, bundle: Path, named: SessionState | None,
                 keys_folder: KeysFolder) -> SessionState:
    """The session whose output key opens this output volume (the named one, if given)."""
    try:
        read_tag(fspf)  # a malformed FSPF is named as such, not as a key no session has
    except InputError as error:
        raise InputError(f"{bundle}: {OUTPUT_VOLUME}: {error.message}") from None
    if named is not None:
        if not _key_opens(fspf, named.output_key):
            raise WrongKeyError(f"wrong key: the output key of session {named.name} does not "
                                f"open the {OUTPUT_VOLUME} volume in {bundle}")
        return named
    candidates = keys_folder.all_sessions()
    if not candidates:
        raise InputError(f"{keys_folder.root} holds no session; run tdapp encryptedpush first")
    matching = [state for state in candidates if _key_opens(fspf, state.output_key)]
    if not matching:
        raise WrongKeyError(f"wrong key: none of the {len(candidates)} sessions in "
                            f"{keys_folder.root} opens the {OUTPUT_VOLUME} volume in {bundle}")
    if len(matching) > 1:
        names = ", ".join(state.name for state in matching)
        raise InputError(f"the {OUTPUT_VOLUME} volume in {bundle} opens with the keys of "
                         f"several sessions ({names}); choose one with --session NAME")
    return matching[0]


def _key_opens(fspf: bytes, key: VolumeKey) -> bool:
    """Whether the FSPF was sealed with ``key`` (its key commitment); nothing else is trusted.

    The FSPF's own tag is passed only to get past the tag check, and any damage
    found after the key check still means the key fits: the real opening later
    checks the CAS's tag and reports that damage.
    """
    try:
        open_fspf(fspf, key, read_tag(fspf))
    except WrongKeyError:
        return False
    except TdappError:
        return True
    return True


def _client_for_recorded_cas(state: SessionState) -> CasClient:
    """A client for the CAS the session was pushed to, refusing any other certificate.

    The pin is read once and the same certificate is both compared and used as
    the client's only trust anchor, so a pin replaced in between cannot slip in.
    """
    try:
        pinned: x509.Certificate | None = PinStore().get(state.cas)
    except ValueError:
        raise RefusedError(f"the pinned certificate for the CAS at {state.cas} cannot be read; "
                           f"session {state.name} was pushed to the CAS with certificate "
                           f"{state.cas_fingerprint}") from None
    if pinned is None:
        raise RefusedError(
            f"the CAS at {state.cas} is not pinned; session {state.name} was pushed to the CAS "
            f"with certificate {state.cas_fingerprint}: check it and run: tdapp cas attest "
            f"{state.cas} --accept {state.cas_fingerprint}")
    now = fingerprint(pinned)
    if not hmac.compare_digest(now.encode(), state.cas_fingerprint.encode()):
        raise RefusedError(
            f"the CAS pinned for {state.cas} now has certificate {now}, but session "
            f"{state.name} was pushed to the CAS with certificate {state.cas_fingerprint}; "
            f"refusing to ask another CAS for its output tag (re-pin the original CAS with: "
            f"tdapp cas attest {state.cas} --accept {state.cas_fingerprint})")
    client = CasClient(state.cas, pinned, ClientIdentity.load_or_create())
    client.ensure_certified()
    return client

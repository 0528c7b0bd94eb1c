"""The user's workflow around a DApp run: ``encryptedpush`` before it, ``decrypt`` after it.

``encryptedpush`` makes fresh volume keys, seals the inputs and an empty
output volume, creates the session on the CAS and uploads the volumes;
``decrypt`` verifies the output volume against the tag the CAS holds now and
writes the plaintext. The keys stay in the KEYS folder (mode 0600), never
anywhere else. Nothing here may accept an output volume that is not the
latest.
"""

from __future__ import annotations

import json
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from tdapp.client.cas_client import CasClient
from tdapp.core.address import Address
from tdapp.errors import InputError
from tdapp.policy import fill_template, parse_session
from tdapp.tls import fingerprint
from tdapp.volume import Volume, VolumeKey, VolumeTag
from tdapp.volume.bundle import find_bundle, pack, unpack
from tdapp.volume.layout import write_atomically

INPUT_VOLUME = "encrypted-input-files"
OUTPUT_VOLUME = "encrypted-output-files"
STATE_FILE = "tdapp-session.json"
SERVICE = "application"


@dataclass(frozen=True)
class PushResult:
    session: str
    cas: str
    url: str

    @property
    def command_line(self) -> str:
        return (f"--sessionID {self.session}/{SERVICE} --secretManagementService {self.cas} "
                f"--url {self.url}")


def encrypted_push(*, application: str, template: Path, conf: Path, inputs: Path,
                   cas: Address, push: str, variables: dict[str, str]) -> PushResult:
    from tdapp.transfer import upload

    if not inputs.is_dir():
        raise InputError(f"inputs folder {inputs} does not exist")
    try:
        template_text = template.read_text(encoding="utf-8")
    except OSError as error:
        raise InputError(f"cannot read template {template}: {error.strerror}") from None
    conf.mkdir(mode=0o700, parents=True, exist_ok=True)
    session_name = f"tdapp-{secrets.token_hex(16)}"
    with tempfile.TemporaryDirectory(prefix="tdapp-push-") as work:
        root = Path(work)
        keys = {INPUT_VOLUME: VolumeKey.generate(), OUTPUT_VOLUME: VolumeKey.generate()}
        empty = root / "empty"
        empty.mkdir()
        made = {
            INPUT_VOLUME: Volume.create(root / INPUT_VOLUME, keys[INPUT_VOLUME], source=inputs),
            OUTPUT_VOLUME: Volume.create(root / OUTPUT_VOLUME, keys[OUTPUT_VOLUME], source=empty),
        }
        filled = fill_template(template_text, {
            **variables, "SESSION": session_name,
            "INPUT_FSPF_KEY": keys[INPUT_VOLUME].hex(),
            "INPUT_FSPF_TAG": made[INPUT_VOLUME].tag.hex(),
            "OUTPUT_FSPF_KEY": keys[OUTPUT_VOLUME].hex(),
            "OUTPUT_FSPF_TAG": made[OUTPUT_VOLUME].tag.hex(),
        })
        parse_session(filled, source=str(template))
        client = CasClient.connect(cas)
        created = client.request("POST", "/v1/sessions", filled.encode())
        bundle = root / "scone-upload.zip"
        pack({name: root / name for name in made}, bundle)
        url = upload(bundle, push)
    state = {
        "session": session_name, "service": SERVICE, "application": application,
        "cas": str(cas), "cas_fingerprint": fingerprint(client.pinned),
        "session_hash": created["hash"], "url": url,
        "volumes": {name: {"key": keys[name].hex(), "tag": made[name].tag.hex()}
                    for name in made},
    }
    write_atomically(conf / STATE_FILE, json.dumps(state, indent=2).encode(), mode=0o600)
    return PushResult(session_name, str(cas), url)


def load_state(conf: Path) -> dict[str, Any]:
    path = conf / STATE_FILE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path} does not exist; run tdapp encryptedpush first") from None
    except (OSError, ValueError) as error:
        raise InputError(f"cannot read {path}: {error}") from None
    if not isinstance(state, dict) or "volumes" not in state:
        raise InputError(f"{path} is not a tdapp session state file")
    return state


def decrypt(*, conf: Path, encrypted: Path, out: Path) -> int:
    """Verify the output volume against the CAS's current tag and extract it; returns files."""
    state = load_state(conf)
    output = state["volumes"].get(OUTPUT_VOLUME)
    if not isinstance(output, dict):
        raise InputError(f"{conf / STATE_FILE} has no {OUTPUT_VOLUME} volume")
    client = CasClient.connect(Address.parse(str(state["cas"])))
    answer = client.request(
        "GET", f"/v1/volume-tags?session={quote(str(state['session']))}&volume={OUTPUT_VOLUME}")
    current = answer.get("tag")
    if not isinstance(current, str):
        raise InputError(f"the CAS holds no tag for {OUTPUT_VOLUME} of {state['session']}")
    bundle = find_bundle(encrypted)
    with tempfile.TemporaryDirectory(prefix="tdapp-decrypt-") as work:
        volumes = unpack(bundle, Path(work))
        folder = volumes.get(OUTPUT_VOLUME)
        if folder is None:
            raise InputError(f"{bundle} holds no {OUTPUT_VOLUME} volume")
        opened = Volume.open(folder, VolumeKey.from_hex(str(output["key"])),
                             VolumeTag.from_hex(current), name=OUTPUT_VOLUME)
        report = opened.extract(out)
    return report.files

"""Three parties share one DApp run through the CAS, driven through ``tdapp`` as users would.

A data owner (D) pushes a dataset, an app owner (A) keeps a generated key in a
session of its own, and a requester (R, the one who runs ``tdapp up``) runs the
DApp of examples/three_parties with both, once D and A export them to R's
session pinned by its hash. Each party is a TDAPP_HOME of its own that pinned
the CAS. The attacks check effects, not messages: a fourth identity (E) gets
no run and no key, parties cannot read one another's sessions, a removed
export stops the next run, a reference to a missing secret stores nothing,
the generated secrets appear nowhere outside the encrypted output, the output
key alone decrypts, and the imported dataset is not written to.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.x509.oid import NameOID
from walk_fixtures import PYTHON_HOST, running_up

from tdapp.runtime.mounts import fuse_usable

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "three_parties"
IMAGE = "three_parties"
ENTRYPOINT = "/usr/bin/python3 -I /app.py"
DATA = "the data owner's numbers: 4 8 15 16 23 42"
pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is missing")


@dataclass
class Party:
    """One identity: its own TDAPP_HOME (and HOME), working in ``cwd`` (KEYS, DATA, …)."""

    name: str
    env: dict[str, str]
    cwd: Path
    transcript: list[str] = field(default_factory=list)  # every output, for the leak check

    def tdapp(self, *args: str, check: bool = True, env: dict[str, str] | None = None,
              cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([sys.executable, "-m", "tdapp", *args], cwd=cwd or self.cwd,
                              env={**self.env, **(env or {})}, capture_output=True, text=True,
                              timeout=120, check=False, stdin=subprocess.DEVNULL)
        self.transcript += [done.stdout, done.stderr]
        if check:
            assert done.returncode == 0, f"{self.name}: tdapp {shlex.join(args)}:\n{done.stderr}"
        return done


@dataclass
class World:
    root: Path
    r: Party
    d: Party
    a: Party
    e: Party
    cas: str
    las: str
    push: str
    mrenclave: str
    ds: str  # D's dataset session
    durl: str
    dataset_tag: str  # as D pushed it
    app: str  # A's session
    rs: str  # R's session
    rh: str
    run_args: list[str]
    run: subprocess.CompletedProcess[str]
    zip: Path
    outputs: Path  # outside root: it holds the secrets in clear
    secrets: dict[str, str]
    proc: ProcSampler


class ProcSampler(threading.Thread):
    """Keeps every distinct /proc/*/cmdline and /proc/*/environ seen while it runs.

    The DApp's own processes (another pid namespace: the sandbox) are kept apart,
    in ``inside``: their environment holds APP_KEY by design (that is where the
    CAS's released configuration puts it), so they show the sampler can see it.
    """

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.seen: set[bytes] = set()
        self.inside: dict[str, set[bytes]] = {"cmdline": set(), "environ": set()}
        self.sweeps = 0
        self.stop = threading.Event()
        self._own = os.readlink("/proc/self/ns/pid")

    def run(self) -> None:
        while not self.stop.is_set():
            for pid in (p for p in os.listdir("/proc") if p.isdigit()):
                try:
                    sandboxed = os.readlink(f"/proc/{pid}/ns/pid") != self._own
                    for part in ("cmdline", "environ"):
                        with open(f"/proc/{pid}/{part}", "rb") as read:
                            (self.inside[part] if sandboxed else self.seen).add(read.read())
                except OSError:
                    continue  # gone, or another user's
            self.sweeps += 1
            time.sleep(0.02)


def _party(root: Path, name: str, cas: str, fingerprint: str) -> Party:
    folder = root / name
    (folder / "work" / "KEYS").mkdir(parents=True)
    env = {"PATH": os.environ["PATH"], "HOME": str(folder), "TDAPP_HOME": str(folder / "home"),
           "LANG": "C.UTF-8"}
    party = Party(name, env, folder / "work")
    party.tdapp("cas", "attest", cas, "--accept", fingerprint)
    return party


def _fields(text: str) -> dict[str, str]:
    return dict(line.split(" ", 1) for line in text.splitlines())


def fetch(url: str, target: Path) -> None:
    subprocess.run(["curl", "--silent", "--show-error", "--fail", "--output", str(target), url],
                   check=True, timeout=60)


def push_requester(party: Party, template: Path, env: dict[str, str], *options: str
                   ) -> tuple[str, list[str]]:
    """encryptedpush of ``template``; R's (or E's) session name and the arguments for run."""
    line = party.tdapp("encryptedpush", "-a", IMAGE, "-t", str(template), *options,
                         env=env).stdout.strip()
    args = shlex.split(line)
    return args[args.index("--sessionID") + 1].split("/")[0], args


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("three")
    with running_up(root) as up:
        announced = json.loads((up.home / "up.json").read_text())
        cas, las, push = announced["cas"], announced["las"], announced["push"]
        fingerprint = re.search(r"fingerprint ([0-9a-f]{64})", (root / "up.log").read_text())
        assert fingerprint is not None
        r = Party("requester", up.env, up.example)
        d, a, e = (_party(root, name, cas, fingerprint.group(1))
                   for name in ("data-owner", "app-owner", "eve"))
        mrenclave = r.tdapp("build", str(EXAMPLE / "app"), "--name", IMAGE, "--entrypoint",
                            ENTRYPOINT, "--heap", "256M", *PYTHON_HOST).stdout.strip()

        (d.cwd / "DATA").mkdir()
        (d.cwd / "DATA" / "numbers.txt").write_text(DATA + "\n")
        pushed = _fields(d.tdapp("dataset", "push", "DATA", "--volume", "dataset",
                                 "--cas", cas, "--push", push).stdout)
        keys = json.loads((d.cwd / "KEYS" / "datasets" / f"{pushed['session']}.json")
                          .read_text())
        app = f"three-parties-app-{os.urandom(6).hex()}"
        a.tdapp("session", "create", str(EXAMPLE / "app.yml"), "-e", f"APP_SESSION={app}",
                "--cas", cas)

        (r.cwd / "INPUTS" / "request.txt").write_text("the requester's question\n")
        names = {"MRENCLAVE": mrenclave, "DATASET_SESSION": pushed["session"],
                 "APP_SESSION": app}
        rs, args = push_requester(r, EXAMPLE / "requester.yml", names, "--cas", cas,
                                  "--push", push)
        rh = r.tdapp("session", "hash", rs, "--cas", cas).stdout.strip()
        d.tdapp("session", "export", pushed["session"], "--volume", "dataset",
                "--to", f"{rs}@{rh}", "--cas", cas)
        a.tdapp("session", "export", app, "--secret", "app_key", "--to", f"{rs}@{rh}",
                "--cas", cas)

        sampler = ProcSampler()
        sampler.start()
        try:
            run = r.tdapp("run", IMAGE, *args, "--url", pushed["url"], "--push", push)
        finally:
            sampler.stop.set()
            sampler.join()
        bundle = r.cwd / "ZIP" / "out.zip"
        fetch(run.stdout.strip(), bundle)
        outputs = tmp_path_factory.mktemp("outputs") / "OUTPUTS"
        r.tdapp("decrypt", "--key", f"KEYS/output-keys/{rs}.json", "--encrypted", str(bundle),
                "--out", str(outputs))
        clear = dict(line.split("=", 1) for line in
                     (outputs / "secrets.txt").read_text().splitlines())
        yield World(root, r, d, a, e, cas, las, push, mrenclave, pushed["session"],
                    pushed["url"], keys["volumes"]["dataset"]["tag"], app, rs, rh, args, run,
                    bundle, outputs, clear, sampler)


def test_the_requester_gets_the_dataset_and_the_released_secrets(world: World) -> None:
    assert world.run.stdout.strip().startswith("http://127.0.0.1:")
    lines = (world.outputs / "result.txt").read_text().splitlines()
    assert f"dataset numbers.txt: {DATA}" in lines
    for name, variable, size in (("app_key", "APP_KEY", 32),
                                 ("requester_token", "REQUESTER_TOKEN", 24)):
        value = world.secrets[variable]
        assert len(value) == size and value.isascii() and value.isprintable()
        digest = hashlib.sha256(value.encode()).hexdigest()
        assert f"{name} sha256 {digest} length {size}" in lines
    assert world.secrets["APP_KEY"] != world.secrets["REQUESTER_TOKEN"]
    assert "certificate loads: yes" in lines
    certificate = x509.load_pem_x509_certificate((world.outputs / "cert.pem").read_bytes())
    common = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    assert [attribute.value for attribute in common] == ["app"]
    # The stored session keeps the references: values exist only in released configurations.
    document = world.r.tdapp("session", "read", world.rs, "--cas", world.cas).stdout
    assert "APP_KEY: $$SCONE::app_key$$" in document
    assert "content: $$SCONE::tls:crt$$" in document


def test_parties_cannot_read_or_export_each_others_sessions(world: World) -> None:
    for party, session in ((world.r, world.ds), (world.a, world.rs), (world.r, world.app),
                           (world.e, world.ds), (world.e, world.app)):
        done = party.tdapp("session", "read", session, "--cas", world.cas, check=False)
        assert done.returncode == 7 and done.stdout == "", (party.name, done.stderr)
        assert "may not read" in done.stderr
    before = world.d.tdapp("session", "hash", world.ds, "--cas", world.cas).stdout
    done = world.e.tdapp("session", "export", world.ds, "--volume", "dataset",
                         "--to", "anything-of-eve", "--cas", world.cas, check=False)
    assert done.returncode == 7 and done.stdout == ""
    assert world.d.tdapp("session", "hash", world.ds, "--cas", world.cas).stdout == before


def _refused_export(world: World, exporter: str, importer: str) -> bool:
    """Whether the exporter's audit log (as the CAS's operator reads it) has a refused
    export naming the importing session."""
    audit = world.r.tdapp("cas", "audit", "--session", exporter, "--json").stdout
    events = [json.loads(line) for line in audit.splitlines()]
    return any(str(event.get("outcome")) == "refused" and event.get("event") == "export"
               and f"'{importer}'" in str(event.get("reason")) for event in events)


def _eve_template(folder: Path, steal: str) -> Path:
    """R's template as E's own session: stealing only the dataset, or only the app key."""
    document: dict[str, Any] = yaml.safe_load((EXAMPLE / "requester.yml").read_text())
    if steal == "dataset":
        document["secrets"][0] = {"name": "app_key", "kind": "ascii", "size": 32}
    else:
        document["volumes"] = [v for v in document["volumes"] if v["name"] != "dataset"]
        mounts = document["images"][0]["volumes"]
        document["images"][0]["volumes"] = [
            {"name": "encrypted-input-files", "path": "/dataset"},
            *(m for m in mounts if m["name"] == "encrypted-output-files")]
    path = folder / f"eve-{steal}.yml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


@pytest.mark.parametrize("steal", ["dataset", "app_key"])
def test_a_fourth_identity_gets_no_run_and_no_key(world: World, steal: str) -> None:
    e = world.e
    if not (e.cwd / "INPUTS").exists():
        (e.cwd / "INPUTS").mkdir()
        (e.cwd / "INPUTS" / "mine.txt").write_text("eve's own file\n")
        e.tdapp("build", str(EXAMPLE / "app"), "--name", IMAGE, "--entrypoint", ENTRYPOINT,
                "--heap", "256M", *PYTHON_HOST)  # the same measurement, in E's own home
    names = {"MRENCLAVE": world.mrenclave, "DATASET_SESSION": world.ds,
             "APP_SESSION": world.app}
    session, args = push_requester(e, _eve_template(e.cwd, steal), names,
                                   "--cas", world.cas, "--push", world.push,
                                   "--las", world.las)
    urls = ["--url", world.durl] if steal == "dataset" else []
    done = e.tdapp("run", IMAGE, *args, *urls, "--push", world.push, "--las", world.las,
                   check=False)
    assert done.returncode == 7 and done.stdout == "", done.stderr
    assert "not granted" in done.stderr
    assert "three_parties: wrote" not in done.stderr  # the program never started
    exporter = world.ds if steal == "dataset" else world.app
    assert _refused_export(world, exporter, session)
    everything = b"".join(path.read_bytes() for path in (world.root / "eve").rglob("*")
                          if path.is_file())
    assert world.secrets["APP_KEY"].encode() not in everything
    assert DATA.encode() not in everything
    assert world.secrets["APP_KEY"] not in "".join(e.transcript)


def test_a_reference_to_a_missing_secret_stores_nothing(
        world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"three-parties-nope-{os.urandom(6).hex()}"
    platform = re.search(r"platform ([0-9a-f]{64})", (world.root / "up.log").read_text())
    assert platform is not None
    document = {
        "name": name, "version": "0.3",
        "access_policy": {"read": ["CREATOR"], "update": ["CREATOR"]},
        "services": [{"name": "application", "image_name": IMAGE,
                      "mrenclaves": [world.mrenclave], "command": ENTRYPOINT, "pwd": "/",
                      "environment": {"APP_KEY": "$$SCONE::nope$$"}}],
        "secrets": [{"name": "app_key", "kind": "ascii", "size": 32}],
        "images": [{"name": IMAGE, "mrenclaves": [world.mrenclave]}],
        "security": {"attestation": {"mode": "sim", "platforms": [platform.group(1)]}},
    }
    path = tmp_path / "nope.yml"
    path.write_text(text := yaml.safe_dump(document, sort_keys=False))
    done = world.a.tdapp("session", "create", str(path), "--cas", world.cas, check=False)
    assert done.returncode in (3, 7) and done.stdout == "", done.stderr
    assert "nope" in done.stderr
    # The CAS refuses it too, for a client that skips its own check.
    from tdapp.client.cas_client import CasClient
    from tdapp.core.address import Address
    from tdapp.errors import TdappError

    monkeypatch.setenv("TDAPP_HOME", world.a.env["TDAPP_HOME"])
    with pytest.raises(TdappError, match="nope"):
        CasClient.connect(Address.parse(world.cas)).request("POST", "/v1/sessions",
                                                            text.encode())
    missing = world.a.tdapp("session", "read", name, "--cas", world.cas, check=False)
    assert missing.returncode == 3 and "no session named" in missing.stderr


def _forms(value: str) -> list[bytes]:
    raw = value.encode()
    return [raw, raw.hex().encode(), base64.b64encode(raw), base64.b64encode(raw).rstrip(b"=")]


def test_generated_secrets_appear_nowhere_outside_the_encrypted_output(world: World) -> None:
    values = [world.secrets["APP_KEY"], world.secrets["REQUESTER_TOKEN"]]
    read_r = world.r.tdapp("session", "read", world.rs, "--cas", world.cas)
    read_a = world.a.tdapp("session", "read", world.app, "--cas", world.cas)
    audits = [world.r.tdapp("cas", "audit", *options).stdout for options in ((), ("--json",))]
    released = [event for event in map(json.loads, audits[1].splitlines())
                if event.get("event") == "export" and event.get("outcome") == "accepted"]
    assert {event["session"] for event in released} >= {world.ds, world.app}
    said = "".join(p for party in (world.r, world.d, world.a, world.e)
                   for p in party.transcript)
    texts = [read_r.stdout, read_a.stdout, *audits, said]
    files = [path for path in world.root.rglob("*") if path.is_file()]
    assert any(path.name == "cas.db" for path in files)
    # The sampler watched the run: it saw tdapp run, and the DApp with its own environment.
    assert world.proc.sweeps > 5
    assert any(b"run\x00three_parties" in seen for seen in world.proc.seen)
    assert f"{ENTRYPOINT.replace(' ', chr(0))}\0".encode() in world.proc.inside["cmdline"]
    if any(world.proc.inside["environ"]):  # readable here: the sampler could see a secret
        assert any(f"APP_KEY={values[0]}".encode() in seen
                   for seen in world.proc.inside["environ"])
    for value in values:
        for form in _forms(value):
            assert all(form.decode() not in text for text in texts), "in a command's output"
            holding = [path for path in files if form in path.read_bytes()]
            assert holding == [], f"a secret's bytes are in {holding}"
            assert not any(form in seen for seen in world.proc.seen), "in /proc"


def test_the_output_key_alone_decrypts_the_result(world: World, tmp_path: Path) -> None:
    key_file = world.r.cwd / "KEYS" / "output-keys" / f"{world.rs}.json"
    held = json.loads(key_file.read_text())
    assert held["volumes"] == {"encrypted-output-files": {"key": held["volumes"][
        "encrypted-output-files"]["key"]}}
    state = json.loads((world.r.cwd / "KEYS" / "sessions" / f"{world.rs}.json").read_text())
    assert state["volumes"]["encrypted-input-files"]["key"] not in key_file.read_text()
    lonely = tmp_path / "lonely"
    (lonely / "EMPTY").mkdir(parents=True)
    shutil.copy(key_file, lonely / "output.json")
    shutil.copy(world.zip, lonely / "result.zip")
    world.r.tdapp("decrypt", "--conf", "EMPTY", "--key", "output.json", "--encrypted",
                  "result.zip", "--out", "OUT", cwd=lonely)
    assert ((lonely / "OUT" / "result.txt").read_bytes()
            == (world.outputs / "result.txt").read_bytes())
    assert list((lonely / "EMPTY").iterdir()) == []


def test_the_imported_dataset_is_read_only(world: World) -> None:
    lines = (world.outputs / "result.txt").read_text().splitlines()
    assert any(line.startswith("dataset write: refused (") for line in lines), lines
    assert "volume dataset: unchanged" in world.run.stderr
    document = yaml.safe_load(world.d.tdapp("session", "read", world.ds,
                                            "--cas", world.cas).stdout)
    (volume,) = document["volumes"]
    assert volume["fspf_tag"] == world.dataset_tag  # as D sealed it: the run moved nothing
    assert {"session": world.rs, "session_hash": world.rh} in volume["export"]
    # examples/three_parties/dataset.yml shows this session as it is.
    shown = yaml.safe_load((EXAMPLE / "dataset.yml").read_text())
    assert [sorted(v) for v in shown["volumes"]] == [sorted(volume)]


def test_removing_the_export_refuses_the_next_run(world: World) -> None:
    """On a fresh session of R's (its first one's bundle is spent: its output tag moved)."""
    names = {"MRENCLAVE": world.mrenclave, "DATASET_SESSION": world.ds,
             "APP_SESSION": world.app}
    rs2, args = push_requester(world.r, EXAMPLE / "requester.yml", names, "--cas", world.cas,
                               "--push", world.push)
    rh2 = world.r.tdapp("session", "hash", rs2, "--cas", world.cas).stdout.strip()
    export = ("session", "export", world.ds, "--volume", "dataset", "--to", f"{rs2}@{rh2}",
              "--cas", world.cas)
    world.d.tdapp(*export)
    world.a.tdapp("session", "export", world.app, "--secret", "app_key",
                  "--to", f"{rs2}@{rh2}", "--cas", world.cas)
    world.d.tdapp("session", "unexport", world.ds, "--volume", "dataset", "--to", rs2,
                  "--cas", world.cas)
    run = ("run", IMAGE, *args, "--url", world.durl, "--push", world.push)
    refused = world.r.tdapp(*run, check=False)
    assert refused.returncode == 7 and refused.stdout == "", refused.stderr
    assert "three_parties: wrote" not in refused.stderr
    assert "not granted" in refused.stderr
    assert "tag mismatch" not in refused.stderr
    assert _refused_export(world, world.ds, rs2)
    # The export alone made the difference: given back, the same run goes through; on the
    # FUSE shield where it can, which mounts the imported volume read-only.
    world.d.tdapp(*export)
    shield = ("--shield", "fuse") if fuse_usable() else ()
    done = world.r.tdapp(*run, *shield)
    assert done.stdout.startswith("http://127.0.0.1:")
    if shield:
        assert "volume dataset: mounted by the FUSE shield" in done.stderr
        assert "volume dataset: unchanged" in done.stderr


def test_encryptedpush_can_export_its_input_volume(world: World) -> None:
    names = {"MRENCLAVE": world.mrenclave, "DATASET_SESSION": world.ds,
             "APP_SESSION": world.app}
    before = sorted((world.r.cwd / "KEYS" / "sessions").iterdir())
    bad = world.r.tdapp("encryptedpush", "-a", IMAGE, "-t", str(EXAMPLE / "requester.yml"),
                        "--export-to", f"{world.rs}@not-a-hash", "--cas", world.cas,
                        "--push", world.push, env=names, check=False)
    assert bad.returncode == 2 and "SESSION@HASH" in bad.stderr, bad.stderr
    assert sorted((world.r.cwd / "KEYS" / "sessions").iterdir()) == before  # nothing made
    session, _ = push_requester(world.r, EXAMPLE / "requester.yml", names, "--cas", world.cas,
                                "--push", world.push, "--export-to", f"{world.rs}@{world.rh}")
    document = world.r.tdapp("session", "read", session, "--cas", world.cas).stdout
    exported = next(volume for volume in yaml.safe_load(document)["volumes"]
                    if volume["name"] == "encrypted-input-files")
    assert exported["export"] == [{"session": world.rs, "session_hash": world.rh}]


def test_an_export_public_certificate_is_shown_and_nothing_else(world: World,
                                                                tmp_path: Path) -> None:
    name = f"three-parties-ca-{os.urandom(6).hex()}"
    document = tmp_path / "ca.yml"
    document.write_text(f"name: {name}\nversion: '0.3'\nsecrets:\n"
                        "  - {name: ca, kind: x509-ca, export_public: true}\n"
                        "  - {name: hidden, kind: x509-ca}\n")
    world.a.tdapp("session", "create", str(document), "--cas", world.cas)
    shown = world.a.tdapp("session", "read", name, "--public", "ca", "--cas", world.cas).stdout
    assert x509.load_pem_x509_certificate(shown.encode()).subject
    hidden = world.a.tdapp("session", "read", name, "--public", "hidden", "--cas", world.cas,
                           check=False)
    assert hidden.returncode == 3 and hidden.stdout == "", hidden.stderr
    # Public, but only to the session's readers.
    other = world.e.tdapp("session", "read", name, "--public", "ca", "--cas", world.cas,
                          check=False)
    assert other.returncode == 7 and other.stdout == ""
    # An export is an update: made secrets without migrate get new values, and it says so.
    exported = world.a.tdapp("session", "export", name, "--secret", "ca", "--to", world.rs,
                             "--cas", world.cas)
    assert "new values for secrets ca, hidden" in exported.stderr
    again = world.a.tdapp("session", "read", name, "--public", "ca", "--cas", world.cas).stdout
    assert again != shown


def test_the_data_owners_key_reaches_neither_the_requester_nor_the_host(world: World) -> None:
    """The dataset's key is in the data owner's KEYS and, sealed, in the CAS: nowhere else
    (not the requester's or anyone's files, outputs, or any process's argv or environment
    outside the sandbox during the run)."""
    owner_keys = world.d.cwd / "KEYS" / "datasets" / f"{world.ds}.json"
    key = json.loads(owner_keys.read_text())["volumes"]["dataset"]["key"]
    forms = [key.encode(), key.upper().encode(), bytes.fromhex(key)]
    files = [path for path in world.root.rglob("*") if path.is_file() and path != owner_keys]
    assert any(path.name == "cas.db" for path in files)
    outputs = [path for path in world.outputs.rglob("*") if path.is_file()]
    said = "".join(p for party in (world.r, world.a, world.e) for p in party.transcript)
    for form in forms:
        assert [path for path in files + outputs if form in path.read_bytes()] == []
        assert not any(form in seen for seen in world.proc.seen)
        assert not any(form in seen for part in world.proc.inside.values() for seen in part)
    assert key not in said

"""Every example of docs/guide.md, run as written against a real ``tdapp up``.

The guide marks each example with ``<!-- guide: GROUP -->`` (a ``sh`` or
``python`` block to run) or ``<!-- guide: GROUP file=PATH -->`` (a block the
reader saves as PATH). A test names the groups of its section; their blocks
become one bash script, in the guide's order (files saved, Python run with the
venv's ``python3``), run with ``bash -euo pipefail`` in a fresh folder. Its
TDAPP_HOME is fresh too, holding only what ``tdapp up`` leaves its user
(``up.json`` and the CAS's pin), so the examples find the services as a reader's
would, by the addresses ``tdapp up`` announced. Sections 4 to 6 start, as the
guide says, where section 1's build leaves off: its image store and folder are
copied in. The tests then check what the guide says the examples print and do,
and that the refusals it shows leave nothing behind (no session, no released
key, no moved tag), asking ``tdapp`` in-process as the section's user.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import CliResult
from moto_fixtures import AWS, running_moto
from walk_fixtures import Walk, running_up

REPO = Path(__file__).resolve().parent.parent
GUIDE = REPO / "docs" / "guide.md"
BIN = Path(sys.executable).parent  # the venv's bin: tdapp and python3
MARKER = re.compile(r"<!-- guide: ([a-z0-9-]+)(?: file=(\S+))? -->")
FENCE = re.compile(r"```(\w*)")
RUN_LANGUAGES = ("sh", "python")
BUCKET = "tdapp-guide"
AFTER_THE_BUILD = ("shout", "INPUTS")  # and shout.yml: what section 1's build leaves
pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None or shutil.which("jq") is None,
                                reason="the guide's examples need bubblewrap and jq")


@dataclass(frozen=True)
class Block:
    group: str
    language: str
    code: str
    file: str | None  # saved there (relative to the section's folder) instead of run
    line: int


def guide_blocks() -> tuple[list[Block], list[tuple[int, str]]]:
    """The marked blocks of the guide, in order, and (line, language) of unmarked ones."""
    lines = GUIDE.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    unmarked: list[tuple[int, str]] = []
    index = 0
    while index < len(lines):
        fence = FENCE.fullmatch(lines[index])
        if fence is None:
            index += 1
            continue
        end = lines.index("```", index + 1)
        marker = MARKER.fullmatch(lines[index - 1]) if index else None
        if marker is None:
            unmarked.append((index + 1, fence.group(1)))
        else:
            code = "\n".join(lines[index + 1:end]) + "\n"
            blocks.append(Block(marker.group(1), fence.group(1), code, marker.group(2),
                                index + 1))
        index = end + 1
    return blocks, unmarked


def section_script(groups: tuple[str, ...], scratch: Path) -> str:
    parts: list[str] = []
    for number, block in enumerate(guide_blocks()[0]):
        if block.group not in groups:
            continue
        saved = scratch / f"block-{number}"
        saved.write_text(block.code, encoding="utf-8")
        if block.file is not None:
            target = shlex.quote(block.file)
            parts.append(f"mkdir -p \"$(dirname {target})\" && cp {shlex.quote(str(saved))} "
                         f"{target}")
        elif block.language == "python":
            parts.append(f"python3 {shlex.quote(str(saved))}")
        else:
            parts.append(block.code)
    assert parts, f"the guide has no blocks of {groups}"
    return "\n".join(parts)


@dataclass(frozen=True)
class Ran:
    folder: Path
    home: Path
    out: str
    err: str


def run_section(up: Walk, root: Path, *groups: str, after: Ran | None = None,
                env: Mapping[str, str] | None = None) -> Ran:
    """The groups' blocks as one script, as a reader with ``tdapp up`` running would
    (``after``: section 1, starting where its build left off: its image store, and the
    program, template and inputs in its folder)."""
    home, folder, scratch = root / "tdapp-home", root / "work", root / "scratch"
    for made in (home, scratch):
        made.mkdir(mode=0o700, parents=True)
    shutil.copy(up.home / "up.json", home / "up.json")
    shutil.copytree(up.home / "pins", home / "pins")
    folder.mkdir()
    if after is not None:
        for name in AFTER_THE_BUILD:
            shutil.copytree(after.folder / name, folder / name, symlinks=True)
        shutil.copy(after.folder / "shout.yml", folder / "shout.yml")
        shutil.copytree(after.home / "images", home / "images", symlinks=True)
    environment = {"PATH": f"{BIN}:{os.environ['PATH']}", "HOME": str(root),
                   "TDAPP_HOME": str(home), "LANG": "C.UTF-8", **(env or {})}
    script = section_script(groups, scratch)
    with (root / "out").open("w") as out, (root / "err").open("w") as err:
        # Files, not pipes: a background process the script left (a transfer service)
        # cannot hold the test up; its whole process group is ended afterwards.
        process = subprocess.Popen(["bash", "-euo", "pipefail", "-c", script], cwd=folder,
                                   env=environment, stdout=out, stderr=err,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            code = process.wait(timeout=300)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
    ran = Ran(folder, home, (root / "out").read_text(), (root / "err").read_text())
    assert code == 0, f"the guide's {groups} failed ({code}):\n{ran.out}\n{ran.err}"
    return ran


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Walk]:
    with running_up(tmp_path_factory.mktemp("guide-up")) as started:
        yield started


@pytest.fixture(scope="module")
def shout(up: Walk, tmp_path_factory: pytest.TempPathFactory) -> Ran:
    """Section 1, whose build sections 4 to 6 start from."""
    return run_section(up, tmp_path_factory.mktemp("guide-shout"), "shout", "own-dapp")


Tdapp = Callable[..., CliResult]


@pytest.fixture
def as_user(cli: Tdapp, monkeypatch: pytest.MonkeyPatch) -> Callable[..., CliResult]:
    """``tdapp`` in-process as the user of a TDAPP_HOME (the section's, Bob's, …)."""

    def run(home: Path, *args: str) -> CliResult:
        monkeypatch.setenv("TDAPP_HOME", str(home))
        return cli(*args)

    return run


def test_every_example_of_the_guide_is_marked_and_run() -> None:
    blocks, unmarked = guide_blocks()
    assert [language for _, language in unmarked if language] == [], unmarked
    for block in blocks:
        assert block.group in TESTED, f"guide line {block.line}: group {block.group} is not run"
        if block.file is None:
            assert block.language in RUN_LANGUAGES, f"guide line {block.line}"
        else:
            assert not Path(block.file).is_absolute() and ".." not in Path(block.file).parts
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert "(docs/guide.md)" in readme


def test_a_dapp_of_ones_own(shout: Ran) -> None:
    ran = shout
    assert ran.out.splitlines()[-1] == "HELLO WORLD"
    assert (ran.folder / "OUTPUTS" / "greeting.txt").read_text() == "HELLO WORLD\n"
    assert re.search(r"^[0-9a-f]{64}$", ran.out, re.M)  # the measurement tdapp build printed
    assert "shout: greeting.txt" in ran.err  # the program's own output, on run's stderr


def test_injection_files_carry_a_made_secret_to_the_program_not_the_document(
        up: Walk, tmp_path: Path, as_user: Tdapp) -> None:
    ran = run_section(up, tmp_path, "injection")
    label, mac = (ran.folder / "OUTPUTS" / "order.txt.sig").read_text().split()
    assert label == "sign-v1" and re.fullmatch(r"[0-9a-f]{64}", mac)
    # Signed with a filled-in secret, not with the reference text itself.
    literal = hmac.new(b"$$SCONE::signing_key$$", b"pay 10 to bob\n", hashlib.sha256)
    assert mac != literal.hexdigest()
    assert ran.out.splitlines()[-1].strip() == "key = $$SCONE::signing_key$$"
    # The document its creator reads holds the reference only: of the words of 32 letters
    # and digits in it (the made secret's shape), each is a volume tag (lower-case hex).
    session = json.loads((ran.folder / "KEYS" / "tdapp-session.json").read_text())["session"]
    document = as_user(ran.home, "session", "read", session)
    assert document.code == 0, document.err
    words = re.findall(r"(?<![0-9A-Za-z])[0-9A-Za-z]{32}(?![0-9A-Za-z])", document.out)
    assert words and all(re.fullmatch(r"[0-9a-f]{32}", word) for word in words), words


@pytest.mark.parametrize(("written", "mode"), [("0o400", 0o400), ("256", 0o400), ("0400", None),
                                             ("00", None), ("0", 0)])
def test_a_permission_with_a_leading_zero_is_refused_not_misread(written: str,
                                                               mode: int | None) -> None:
    """YAML reads ``permission: 0400`` as the decimal 400 (mode 0620): refused, naming the
    key and the octal spelling, rather than made into a file others may write."""
    from tdapp.errors import TdappError
    from tdapp.policy import parse_session

    text = ("name: p\nversion: '0.3'\nimages:\n  - name: i\n    injection_files:\n"
            f"      - path: /f\n        content: x\n        permission: {written}\n")
    if mode is None:
        with pytest.raises(TdappError, match=r"permission: .* write the mode as 0o"):
            parse_session(text)
        return
    assert parse_session(text).images[0].injection_files[0].permission == mode


def test_a_namespace_admits_whom_create_sessions_lists(
        up: Walk, tmp_path: Path, as_user: Tdapp) -> None:
    ran = run_section(up, tmp_path, "namespaces")
    assert ran.out.splitlines()[-1] == "refused (exit 7)", ran.out
    assert "may not create sessions in namespace 'team-" in ran.err
    assert "(access_policy.create_sessions)" in ran.err
    bob = as_user(ran.folder / "bob", "session", "list", "--json")
    names = [json.loads(line)["name"] for line in bob.out.splitlines()]
    assert len(names) == 1 and re.fullmatch(r"team-\d+/reports", names[0]), bob.out
    # Carol's refusal left her nothing, under any name.
    carol = as_user(ran.folder / "carol", "session", "list", "--json")
    assert carol.code == 0 and carol.out.strip() == "", carol.err
    mine = as_user(ran.home, "session", "read", names[0].replace("/reports", "/mine"))
    assert mine.code != 0 and "no session named" in mine.err, mine.err
    # Bob's child is his own: the namespace's owner may not read it.
    alice = as_user(ran.home, "session", "read", names[0])
    assert alice.code == 7 and "may not read" in alice.err, alice.err


def test_security_settings_and_a_refusal_with_its_reason(
        up: Walk, shout: Ran, tmp_path: Path, as_user: Tdapp) -> None:
    before = _transfer_objects(up)
    ran = run_section(up, tmp_path, "security", after=shout)
    assert "tolerant.yml: session tolerant is valid and enforceable" in ran.out
    assert ("typo.yml:6: security.attestation.tolerate[0]: expected 'debug-mode', "
            "'hyperthreading'") in ran.err and "got 'outdated'" in ran.err
    assert ran.out.count("refused (exit 3)") == 1 and ran.out.count("refused (exit 7)") == 1
    platform = as_user(ran.home, "las", "platform").out.strip()
    assert platform in ran.out.splitlines()  # what tdapp las platform printed
    assert (f"attestation refused: platform {platform} is not one this session names; the "
            "session's readers find the full reason in its audit log") in ran.err
    other = "0123456789abcdef" * 4
    assert ran.out.splitlines()[-1] == (f"platform {platform} is not in the allowed platforms "
                                        f"(allowed: {other})")
    # Nothing was released or changed: no accepted attestation, the tags as pushed, and
    # only the input bundle uploaded.
    state = json.loads((ran.folder / "KEYS" / "tdapp-session.json").read_text())
    assert state["session"].startswith("elsewhere-")
    history = as_user(ran.home, "session", "history", state["session"], "--json")
    events = [json.loads(line) for line in history.out.splitlines()]
    assert ("attest", "refused") in {(e["event"], e["outcome"]) for e in events}
    assert not any(e["event"] == "attest" and e["outcome"] == "accepted" for e in events)
    tags = json.loads(as_user(ran.home, "session", "tags", state["session"], "--json").out)
    assert tags == {name: volume["tag"] for name, volume in state["volumes"].items()}
    assert len(_transfer_objects(up) - before) == 1


def _transfer_objects(up: Walk) -> set[Path]:
    return {path for path in (up.home / "transfer").rglob("*") if path.is_file()}


@pytest.fixture(scope="module")
def moto_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """moto's S3 server on loopback, with the guide's bucket."""
    with running_moto(tmp_path_factory.mktemp("guide-moto")) as endpoint:
        _s3(endpoint).create_bucket(Bucket=BUCKET)
        yield endpoint


def _s3(endpoint: str) -> Any:
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=AWS["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=AWS["AWS_SECRET_ACCESS_KEY"],
                        region_name=AWS["AWS_DEFAULT_REGION"])


def test_the_s3_backend_direct_and_behind_the_transfer_service(
        up: Walk, shout: Ran, moto_endpoint: str, tmp_path: Path) -> None:
    before = _transfer_objects(up)
    ran = run_section(up, tmp_path, "s3", after=shout,
                      env={**AWS, "AWS_ENDPOINT_URL": moto_endpoint})
    lines = ran.out.splitlines()
    assert lines[-1] == "MORE" and "HELLO WORLD" in lines
    assert (ran.folder / "OUTPUTS" / "more.txt").read_text() == "MORE\n"
    listed = _s3(moto_endpoint).list_objects_v2(Bucket=BUCKET).get("Contents", [])
    keys = sorted(str(item["Key"]) for item in listed)
    direct = [key for key in keys if not key.startswith("bundles/")]
    assert len(direct) == 2 and re.fullmatch(r"in/[A-Za-z0-9_-]{22}/scone-upload\.zip",
                                             direct[0]), keys
    assert re.fullmatch(r"out/[A-Za-z0-9_-]{22}/scone-upload\.zip", direct[1]), keys
    assert f"--url s3://{BUCKET}/{direct[0]}" in ran.out
    served = [key for key in keys if key.startswith("bundles/")]
    assert len(served) == 2 and all(re.fullmatch(r"bundles/[^/]+/scone-upload\.zip", key)
                                    for key in served), keys
    assert _transfer_objects(up) == before  # nothing went through tdapp up's service


def test_the_python_api(up: Walk, shout: Ran, tmp_path: Path) -> None:
    ran = run_section(up, tmp_path, "python", after=shout)
    lines = ran.out.splitlines()
    assert lines[:3] == ["files: ['greeting.txt']", "verified: 1 file(s), 12 bytes",
                         "greeting: hello world"], ran.out
    assert lines[3].startswith("refused: tag mismatch (rollback or tampering)"), ran.out
    assert re.fullmatch(r"decrypted 1 file\(s\) of tdapp-[0-9a-f]{32}", lines[4]), ran.out
    assert lines[5] == "HELLO WORLD"
    assert lines[6].startswith("refused (exit 4): volume encrypted-output-files: tag mismatch")
    assert not (ran.folder / "OLD").exists()  # the refused older output wrote nothing


TESTED = frozenset({"shout", "own-dapp", "injection", "namespaces", "security", "s3", "python"})

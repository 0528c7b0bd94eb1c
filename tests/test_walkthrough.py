"""The seed's walkthrough, driven through ``tdapp`` as a user would, and its attacks."""

from __future__ import annotations

import shutil
import subprocess
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from walk_fixtures import PYTHON_HOST, Walk, output_tag, push, running_up, transfer_objects

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is missing")


@pytest.fixture(scope="module")
def walk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Walk]:
    with running_up(tmp_path_factory.mktemp("walk")) as started:
        started.tdapp("build", str(REPO / "examples" / "copy_dapp"), "--name", "copy_demo",
                      "-o", str(started.example / "KEYS" / "copy_dapp.yml"))
        yield started


def fetch(url: str, target: Path) -> None:
    subprocess.run(["curl", "--silent", "--show-error", "--fail", "--output", str(target), url],
                   check=True, timeout=60)


def test_the_walkthrough_prints_hello_world_and_hello_together(walk: Walk) -> None:
    command = push(walk, {"f1.txt": "Hello world\n", "f2.txt": "Hello together\n"})
    url = walk.tdapp("run", "copy_demo", *command, "--push", walk.push).stdout.strip()
    assert url.startswith("http://127.0.0.1:") and "\n" not in url
    fetch(url, walk.example / "ZIP" / "encryptedOutputFiles.zip")
    walk.tdapp("decrypt")
    assert (walk.example / "OUTPUTS" / "f1.txt").read_text() == "Hello world\n"
    assert (walk.example / "OUTPUTS" / "f2.txt").read_text() == "Hello together\n"

    again = walk.tdapp("run", "copy_demo", *command, "--push", walk.push, check=False)
    assert again.returncode != 0 and again.stdout == ""
    assert "encrypted-output-files" in again.stderr
    assert "tag mismatch (rollback or tampering)" in again.stderr


def test_decrypt_refuses_tampered_foreign_and_old_outputs(walk: Walk) -> None:
    zips = walk.example / "ZIP"
    outputs = walk.example / "OUTPUTS"
    first = push(walk, {"a.txt": "first session\n"})
    first_state = (walk.example / "KEYS" / "tdapp-session.json").read_bytes()
    foreign = walk.example / "foreign.zip"
    fetch(walk.tdapp("run", "copy_demo", *first, "--push", walk.push).stdout.strip(), foreign)

    second = push(walk, {"b.txt": "second session\n"})
    original_url = second[second.index("--url") + 1]
    url = walk.tdapp("run", "copy_demo", *second, "--push", walk.push).stdout.strip()
    good = walk.example / "good.zip"
    fetch(url, good)
    shutil.rmtree(outputs)
    outputs.mkdir()
    (outputs / "keep.txt").write_text("mine")

    def refused(bundle: Path, reason: str, *options: str) -> None:
        for old in zips.iterdir():
            old.unlink()
        shutil.copy(bundle, zips / "encryptedOutputFiles.zip")
        done = walk.tdapp("decrypt", *options, check=False)
        assert done.returncode != 0, done.stderr
        assert reason in done.stderr, done.stderr
        assert sorted(p.name for p in outputs.iterdir()) == ["keep.txt"]

    flipped = walk.example / "flipped.zip"
    _flip_in_object(good, flipped)
    refused(flipped, "failed authentication")
    # KEYS keeps both sessions, so the first one's output is foreign only to the second.
    refused(foreign, "wrong key", "--session", second[1].split("/")[0])
    older = walk.example / "older.zip"
    fetch(original_url, older)
    refused(older, "tag mismatch (rollback or tampering)")
    (walk.example / "KEYS" / "tdapp-session.json").write_bytes(first_state)


def _flip_in_object(source: Path, target: Path) -> None:
    with zipfile.ZipFile(source) as reading, zipfile.ZipFile(target, "w") as writing:
        flipped = False
        for member in reading.infolist():
            data = reading.read(member)
            if not flipped and "encrypted-output-files/objects/" in member.filename and data:
                data = bytes([data[0] ^ 1]) + data[1:]
                flipped = True
            writing.writestr(member, data)
    assert flipped


def test_host_flags_cannot_change_the_command(walk: Walk) -> None:
    command = push(walk, {"x.txt": "x\n"})
    done = walk.tdapp("run", "copy_demo", *command, "--push", walk.push, "--command", "/bin/sh",
                      check=False)
    assert done.returncode == 2 and "--command" in done.stderr


def _build(walk: Walk, source: Path, name: str, template: str, *extra: str) -> None:
    walk.tdapp("build", str(source), "--name", name, "-o", str(walk.example / "KEYS" / template),
               *extra)


def test_a_failing_program_moves_no_tag_and_uploads_nothing(
        walk: Walk, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    app = tmp_path / "failing"
    app.mkdir()
    (app / "fail.py").write_text(
        "import sys\nopen('/encryptedOutputs/partial.txt', 'w').write('half')\n"
        "print('disk quota exceeded, giving up', file=sys.stderr)\nsys.exit(3)\n")
    _build(walk, app, "failing", "failing.yml", "--entrypoint", "/usr/bin/python3 -I /fail.py",
           "--heap", "256M",
           *PYTHON_HOST)
    command = walk.tdapp("encryptedpush", "--application", "failing",
                         "-t", "KEYS/failing.yml").stdout.split()
    before_tag, before_objects = output_tag(walk, monkeypatch), transfer_objects(walk)
    done = walk.tdapp("run", "failing", *command, "--push", walk.push, check=False)
    assert done.returncode == 9 and done.stdout == ""
    assert "status 3" in done.stderr and "disk quota exceeded" in done.stderr
    assert output_tag(walk, monkeypatch) == before_tag
    assert transfer_objects(walk) == before_objects


def test_the_wordcount_dapp_counts_100_mb(walk: Walk, tmp_path: Path) -> None:
    _build(walk, REPO / "examples" / "wordcount", "wordcount", "wordcount.yml",
           "--entrypoint", "/usr/bin/python3 -I /wordcount.py", "--heap", "512M", *PYTHON_HOST)
    vocabulary = {"Trusted": 5, "dapps": 3, "keep": 2, "secrets": 1, "été": 4}
    block = " ".join(word for word, n in vocabulary.items() for _ in range(n)) + "\n"
    repeat = (1 << 20) // len(block.encode()) + 1
    blocks = 100
    inputs = walk.example / "INPUTS"
    shutil.rmtree(inputs)
    inputs.mkdir()
    with (inputs / "corpus.txt").open("w", encoding="utf-8") as corpus:
        for _ in range(blocks):
            corpus.write(block * repeat)
    assert (inputs / "corpus.txt").stat().st_size >= 100 * 1024 * 1024
    command = walk.tdapp("encryptedpush", "--application", "wordcount",
                         "-t", "KEYS/wordcount.yml").stdout.split()
    url = walk.tdapp("run", "wordcount", *command, "--push", walk.push).stdout.strip()
    zips = walk.example / "ZIP"
    for old in zips.iterdir():
        old.unlink()
    fetch(url, zips / "out.zip")
    out = walk.example / "OUTPUTS"
    shutil.rmtree(out)
    walk.tdapp("decrypt")
    counts = dict(line.split("\t") for line in
                  (out / "counts.tsv").read_text(encoding="utf-8").splitlines())
    assert {word: int(n) for word, n in counts.items()} == {
        word.casefold(): n * repeat * blocks for word, n in vocabulary.items()}
    shutil.rmtree(inputs)
    inputs.mkdir()


def test_a_rebuilt_image_with_a_changed_byte_is_refused(walk: Walk, tmp_path: Path) -> None:
    command = push(walk, {"f.txt": "x\n"})
    changed = tmp_path / "copy_dapp"
    shutil.copytree(REPO / "examples" / "copy_dapp", changed)
    source = changed / "copy_files.c"
    text = source.read_text()
    assert "copy_files: copied" in text
    source.write_text(text.replace("copy_files: copied", "copy_files: Copied"))  # one byte
    try:
        walk.tdapp("build", str(changed), "--name", "copy_demo")
        done = walk.tdapp("run", "copy_demo", *command, "--push", walk.push, check=False)
        assert done.returncode != 0 and done.stdout == ""
        assert "is not one this service accepts" in done.stderr  # told to the anonymous runtime
    finally:
        walk.tdapp("build", str(REPO / "examples" / "copy_dapp"), "--name", "copy_demo")


def test_a_run_asked_for_a_tee_this_machine_lacks_fails_cleanly(walk: Walk) -> None:
    command = push(walk, {"f.txt": "x\n"})
    for tee, named in (("tsm", "/sys/kernel/config/tsm/report"),
                       ("gramine", "/dev/attestation")):
        done = walk.tdapp("run", "copy_demo", *command, "--push", walk.push, "--tee", tee,
                          check=False)
        assert done.returncode == 6 and done.stdout == "", done.stderr
        assert named in done.stderr and "Traceback" not in done.stderr
    # auto finds no TEE here and the session (debug CAS) accepts sim: the LAS is used.
    url = walk.tdapp("run", "copy_demo", *command, "--push", walk.push, "--tee", "auto")
    assert "attester: sim" in url.stderr and url.stdout.startswith("http://127.0.0.1:")

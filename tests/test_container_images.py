"""DApps taken from container images: built without Docker, measured whole, run as ``/``.

The images are written by tests/oci_images.py (layers as tar files, an OCI
layout or archive, a ``docker save`` archive) around programs compiled here with
``gcc -static``, so they need nothing from the host. The walkthrough then runs
them through ``tdapp build --image``, ``encryptedpush``, ``run`` and ``decrypt``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from oci_images import Entry, write_docker_archive, write_oci_archive, write_oci_layout
from walk_fixtures import Walk, push, running_up

from tdapp.runtime.mounts import fuse_usable

REPO = Path(__file__).resolve().parent.parent
HOSTNAME = "image-of-the-dapp\n"
pytestmark = [
    pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is missing"),
    pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is missing"),
]


def compile_static(source: Path, target: Path) -> bytes:
    subprocess.run(["gcc", "-Wall", "-O2", "-static", "-o", str(target), str(source)],
                   check=True, timeout=120, capture_output=True)
    return target.read_bytes()


@pytest.fixture(scope="module")
def programs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    folder = tmp_path_factory.mktemp("programs")
    return {
        "copy": compile_static(REPO / "examples" / "copy_dapp" / "copy_files.c",
                               folder / "copy_files"),
        "lister": compile_static(REPO / "tests" / "data" / "lister.c", folder / "lister"),
    }


@pytest.fixture(scope="module")
def walk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Walk]:
    with running_up(tmp_path_factory.mktemp("walk")) as started:
        yield started


def base_layer() -> list[Entry]:
    return [
        Entry("etc", "dir", mode=0o755),
        Entry("etc/hostname", data=HOSTNAME.encode()),
        Entry("etc/passwd", data=b"root:x:0:0:root:/:/application\n"
                                 b"app:x:1000:1000:app:/:/application\n"),
        Entry("etc/group", data=b"root:x:0:\napp:x:1000:\n"),
        Entry("tmp", "dir", mode=0o1777),
    ]


def copy_image(program: bytes, extra: list[Entry] | None = None) -> list[list[Entry]]:
    return [base_layer(), [Entry("application", data=program, mode=0o755), *(extra or [])]]


COPY_CONFIG = {"config": {"Entrypoint": ["/application"], "WorkingDir": "/",
                          "Env": ["PATH=/", "GREETING=hello"]}}


def build(walk: Walk, reference: str, name: str) -> str:
    done = walk.tdapp("build", "--image", reference, "--name", name, "-o",
                      str(walk.example / "KEYS" / f"{name}.yml"))
    return done.stdout.strip()


def run_and_decrypt(walk: Walk, name: str, files: dict[str, str], *extra: str) -> Path:
    command = push(walk, files, name, f"{name}.yml")
    url = walk.tdapp("run", name, *command, "--push", walk.push, *extra).stdout.strip()
    zips = walk.example / "ZIP"
    subprocess.run(["curl", "--silent", "--show-error", "--fail", "--output",
                    str(zips / "out.zip"), url], check=True, timeout=60)
    outputs = walk.example / "OUTPUTS"
    shutil.rmtree(outputs)
    outputs.mkdir()
    walk.tdapp("decrypt")
    return outputs


def test_the_walkthrough_with_the_copy_dapp_from_an_oci_image(
        walk: Walk, programs: dict[str, bytes], tmp_path: Path) -> None:
    layout = tmp_path / "copy-oci"
    digest = write_oci_layout(layout, copy_image(programs["copy"]), COPY_CONFIG, tag="v1")
    measured = build(walk, f"oci:{layout}:v1", "copy_oci")
    assert len(measured) == 64

    template = (walk.example / "KEYS" / "copy_oci.yml").read_text()
    assert "command: /application" in template and measured in template
    assert "GREETING: hello" in template and digest in template

    outputs = run_and_decrypt(walk, "copy_oci", {"f1.txt": "Hello world\n",
                                                 "f2.txt": "Hello together\n"})
    assert (outputs / "f1.txt").read_text() == "Hello world\n"
    assert (outputs / "f2.txt").read_text() == "Hello together\n"

    listed = json.loads(walk.tdapp("images", "--json").stdout)
    entry = next(image for image in listed if image["name"] == "copy_oci")
    assert entry["source"] == {"reference": f"oci:{layout}:v1", "digest": digest}
    assert entry["host_paths"] == []
    table = walk.tdapp("images").stdout
    assert f"oci:{layout}:v1 {digest[:19]}" in table


def test_one_image_one_measurement_whatever_its_packaging_and_any_change_shows(
        walk: Walk, programs: dict[str, bytes], tmp_path: Path) -> None:
    layers = copy_image(programs["copy"])
    write_oci_layout(tmp_path / "one", layers, COPY_CONFIG)
    write_oci_layout(tmp_path / "two", layers, COPY_CONFIG)
    write_oci_archive(tmp_path / "three.tar", layers, COPY_CONFIG)
    write_docker_archive(tmp_path / "four.tar", layers, COPY_CONFIG)
    values = {
        build(walk, f"oci:{tmp_path / 'one'}", "same-1"),
        build(walk, f"oci:{tmp_path / 'two'}", "same-2"),
        build(walk, f"oci-archive:{tmp_path / 'three.tar'}", "same-3"),
        build(walk, f"docker-archive:{tmp_path / 'four.tar'}", "same-4"),
    }
    assert len(values) == 1
    (value,) = values
    assert {walk.tdapp("measure", f"same-{i}").stdout.strip() for i in range(1, 5)} == {value}

    changes = {
        "a byte of a file": [base_layer(), [Entry("application", data=programs["copy"] + b"\0",
                                                  mode=0o755)]],
        "a mode": [base_layer(), [Entry("application", data=programs["copy"], mode=0o700)]],
        "an empty folder": copy_image(programs["copy"], [Entry("data", "dir", mode=0o755)]),
        "a symbolic link": copy_image(programs["copy"], [Entry("bin", "symlink",
                                                               target="/application")]),
        "a whiteout": [*copy_image(programs["copy"]), [Entry("etc/.wh.group")]],
    }
    seen = {value}
    for index, (what, changed) in enumerate(changes.items()):
        write_oci_layout(tmp_path / f"changed-{index}", changed, COPY_CONFIG)
        other = build(walk, f"oci:{tmp_path / f'changed-{index}'}", f"changed-{index}")
        assert other not in seen, f"changing {what} did not change the measurement"
        seen.add(other)


@pytest.mark.parametrize("shield", ["tmpfs", "fuse"])
def test_the_program_sees_only_the_image_and_its_volumes(
        walk: Walk, programs: dict[str, bytes], tmp_path: Path, shield: str) -> None:
    if shield == "fuse" and not fuse_usable():
        pytest.skip("FUSE is not usable here")
    layers = [base_layer(), [Entry("lister", data=programs["lister"], mode=0o755)]]
    config = {"config": {"Entrypoint": ["/lister"], "User": "app"}}
    write_docker_archive(tmp_path / "lister.tar", layers, config, repo_tag="lister:latest")
    build(walk, f"docker-archive:{tmp_path / 'lister.tar'}", "lister")
    outputs = run_and_decrypt(walk, "lister", {"in.txt": "x\n"}, "--shield", shield)
    listing = (outputs / "listing.txt").read_text().split()
    assert listing == sorted(["dev", "encryptedInputs", "encryptedOutputs", "etc", "lister",
                              "proc", "tmp"])
    assert (outputs / "hostname.txt").read_text() == HOSTNAME
    assert Path("/etc/hostname").read_text(errors="replace") != HOSTNAME
    assert (outputs / "ids.txt").read_text() == "1000:1000\n"  # the image's User


EVIL = [
    ("dot-dot entry", [Entry("../escaped-by-test", data=b"x")], "../escaped-by-test"),
    ("link leaving the root", [Entry("etc", "dir", mode=0o755),
                               Entry("etc/shadow", "symlink", target="../../../etc/shadow")],
     "etc/shadow"),
    ("hard link to a host file", [Entry("passwd", "hardlink", target="/etc/passwd")],
     "passwd"),
    ("write through a link", [Entry("etc", "symlink", target="/etc"),
                              Entry("etc/escaped-by-test", data=b"x")], "escaped-by-test"),
    ("character device", [Entry("dev-null", "chardev")], "dev-null"),
    ("block device", [Entry("disk", "blockdev")], "disk"),
]


@pytest.mark.parametrize(("label", "layer", "named"), EVIL, ids=[case[0] for case in EVIL])
def test_hostile_layers_are_refused_and_nothing_is_written(
        walk: Walk, programs: dict[str, bytes], tmp_path: Path, label: str,
        layer: list[Entry], named: str) -> None:
    layout = tmp_path / "layout"
    write_oci_layout(layout, [[Entry("application", data=programs["copy"], mode=0o755)], layer],
                     COPY_CONFIG)
    store = walk.home / "images"
    before = sorted(path.name for path in store.iterdir()) if store.exists() else []
    outside = sorted(tmp_path.parent.iterdir())
    done = walk.tdapp("build", "--image", f"oci:{layout}", "--name", "evil", check=False)
    assert done.returncode == 4, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 or lines[-1].startswith("tdapp: error:"), done.stderr
    assert lines[-1].startswith("tdapp: error:") and named in lines[-1], done.stderr
    assert "Traceback" not in done.stderr
    after = sorted(path.name for path in store.iterdir()) if store.exists() else []
    assert after == before  # no image, no staging folder left behind
    assert sorted(tmp_path.parent.iterdir()) == outside
    assert not Path("/etc/escaped-by-test").exists()
    assert not (tmp_path / "escaped-by-test").exists()


def test_bad_references_and_options(walk: Walk, tmp_path: Path) -> None:
    cases = [
        (["--image", "nope:thing", "--name", "x"], 2, "nope:thing"),
        (["--image", f"oci-archive:{tmp_path / 'missing.tar'}", "--name", "x"], 3,
         "missing.tar"),
        (["--image", "oci:/x", str(tmp_path), "--name", "x"], 2, "either APP_DIR or --image"),
        (["--name", "x"], 2, "either APP_DIR or --image"),
        (["--image", "oci:/x", "--host-path", "/usr/bin", "--name", "x"], 2, "--host-path"),
    ]
    for args, code, named in cases:
        done = walk.tdapp("build", *args, check=False)
        assert done.returncode == code, (args, done.stderr)
        assert named in done.stderr and "Traceback" not in done.stderr, done.stderr

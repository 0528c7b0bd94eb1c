"""The measurement: the documented canonical bytes, and what it does and does not depend on."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from pathlib import Path

import pytest

from tdapp.builder import Config, FileRecord, canonical_bytes, measure_image, measurement
from tdapp.builder.manifest import (
    DirRecord,
    LinkRecord,
    Manifest,
    check_host_paths,
    check_name,
    join_command,
    parse_entrypoint,
    parse_size,
)
from tdapp.builder.measure import Tree, scan_tree
from tdapp.errors import IntegrityError, UsageError
from tdapp.policy import split_command

DOCS = Path(__file__).resolve().parent.parent / "docs" / "measurement.md"
CONFIG = Config(("/copy_files",), 40 * 1024 * 1024, 4 * 1024 * 1024, "sim", ())
HELLO = FileRecord("copy_files", 0o755, 5, hashlib.sha256(b"hello").hexdigest())


def test_the_documented_test_vector() -> None:
    text = DOCS.read_text()
    block = text.split("canonical bytes (199, hex):\n", 1)[1].split("\n\n", 1)[0]
    documented_bytes = bytes.fromhex("".join(block.split()))
    documented_value = re.search(r"measurement:\n([0-9a-f]{64})", text)
    assert documented_value is not None
    assert canonical_bytes(CONFIG, Tree((HELLO,))) == documented_bytes
    assert len(documented_bytes) == 199
    assert measurement(CONFIG, Tree((HELLO,))) == documented_value.group(1)
    assert measurement(CONFIG, Tree((HELLO,))) == hashlib.sha256(documented_bytes).hexdigest()


def test_file_order_and_host_path_order_do_not_matter() -> None:
    other = FileRecord("a/b", 0o644, 0, hashlib.sha256(b"").hexdigest())
    config = dataclasses.replace(CONFIG, host_paths=("/usr/lib/x", "/usr/bin/y"))
    swapped = dataclasses.replace(config, host_paths=("/usr/bin/y", "/usr/lib/x"))
    assert measurement(config, Tree((HELLO, other))) == measurement(swapped, Tree((other, HELLO)))


@pytest.mark.parametrize("change", [
    {"entrypoint": ("/copy_files", "-v")},
    {"entrypoint": ("/other",)},
    {"heap": 40 * 1024 * 1024 + 4096},
    {"stack": 8 * 1024 * 1024},
    {"mode": "hardware"},
    {"host_paths": ("/usr/bin/python3",)},
    {"user": "1000:1000"},
])
def test_every_setting_changes_it(change: dict[str, object]) -> None:
    changed = dataclasses.replace(CONFIG, **change)  # type: ignore[arg-type]
    assert measurement(changed, Tree((HELLO,))) != measurement(CONFIG, Tree((HELLO,)))


@pytest.mark.parametrize("change", [
    {"path": "copy_files2"}, {"mode": 0o744}, {"size": 6},
    {"sha256": hashlib.sha256(b"hellp").hexdigest()},
])
def test_every_file_attribute_changes_it(change: dict[str, object]) -> None:
    changed = dataclasses.replace(HELLO, **change)  # type: ignore[arg-type]
    assert measurement(CONFIG, Tree((changed,))) != measurement(CONFIG, Tree((HELLO,)))


@pytest.mark.parametrize("tree", [
    Tree((HELLO,), dirs=(DirRecord("tmp", 0o1777),)),
    Tree((HELLO,), dirs=(DirRecord("tmp", 0o755),)),
    Tree((HELLO,), links=(LinkRecord("bin", "usr/bin"),)),
    Tree((HELLO,), links=(LinkRecord("bin", "/usr/bin"),)),
    Tree((HELLO,), links=(LinkRecord("sbin", "usr/bin"),)),
])
def test_folders_and_links_are_measured(tree: Tree) -> None:
    others = {measurement(CONFIG, other) for other in (
        Tree((HELLO,)), Tree((HELLO,), dirs=(DirRecord("tmp", 0o1777),)),
        Tree((HELLO,), dirs=(DirRecord("tmp", 0o755),)),
        Tree((HELLO,), links=(LinkRecord("bin", "usr/bin"),)),
        Tree((HELLO,), links=(LinkRecord("bin", "/usr/bin"),)),
        Tree((HELLO,), links=(LinkRecord("sbin", "usr/bin"),)))}
    assert len(others) == 6 and measurement(CONFIG, tree) in others


def test_length_prefixes_keep_fields_apart() -> None:
    # Without lengths, ("/a b",) and ("/a", "b") could encode alike.
    one = dataclasses.replace(CONFIG, entrypoint=("/ab",))
    two = dataclasses.replace(CONFIG, entrypoint=("/a", "b"))
    assert measurement(one, Tree(())) != measurement(two, Tree(()))


def _image_folder(root: Path, files: dict[str, bytes]) -> Path:
    for relative, content in files.items():
        target = root / "rootfs" / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
        target.chmod(0o755 if relative == "copy_files" else 0o644)
    tree = scan_tree(root / "rootfs")
    manifest = Manifest("demo", CONFIG, tree.files, measurement(CONFIG, tree), "now", tree.dirs,
                        tree.links)
    (root / "manifest.json").write_bytes(manifest.to_json())
    return root


def test_measure_image_ignores_timestamps_location_and_recorded_values(tmp_path: Path) -> None:
    files = {"copy_files": b"hello", "lib/data.bin": b"\x00" * 1000, "z/y/x": b"x"}
    first = _image_folder(tmp_path / "one", files)
    second = _image_folder(tmp_path / "elsewhere" / "two", dict(reversed(files.items())))
    for path in (second / "rootfs").rglob("*"):
        os.utime(path, (1e9, 1e9))
    assert measure_image(first) == measure_image(second)
    # The recorded value is not what is returned: it is recomputed.
    manifest = (first / "manifest.json").read_text()
    recorded = re.search(r'"measurement": "([0-9a-f]{64})"', manifest)
    assert recorded is not None
    (first / "manifest.json").write_text(manifest.replace(recorded.group(1), "0" * 64))
    assert measure_image(first) == measure_image(second)


def test_measure_image_sees_added_removed_and_edited_files(tmp_path: Path) -> None:
    image = _image_folder(tmp_path / "img", {"copy_files": b"hello", "d/f": b"data"})
    original = measure_image(image)
    (image / "rootfs" / "extra").write_bytes(b"")
    added = measure_image(image)
    (image / "rootfs" / "extra").unlink()
    assert measure_image(image) == original
    (image / "rootfs" / "d" / "f").unlink()
    removed = measure_image(image)
    assert len({original, added, removed}) == 3


def test_measure_image_records_links_refuses_escaping_ones_and_needs_a_manifest(
        tmp_path: Path) -> None:
    image = _image_folder(tmp_path / "img", {"copy_files": b"hello"})
    before = measure_image(image)
    (image / "rootfs" / "link").symlink_to("/etc/passwd")  # the image's /etc/passwd
    inside = measure_image(image)
    assert inside != before
    (image / "rootfs" / "link").unlink()
    (image / "rootfs" / "link").symlink_to("../etc/passwd")
    with pytest.raises(IntegrityError, match="leads out of the image root"):
        measure_image(image)
    (image / "rootfs" / "link").unlink()
    os.mkfifo(image / "rootfs" / "fifo")
    with pytest.raises(IntegrityError, match="not a regular file, folder or symbolic link"):
        measure_image(image)
    with pytest.raises(Exception, match=r"not a tdapp image \(no manifest.json\)"):
        measure_image(tmp_path)


def test_manifest_round_trip_and_strictness() -> None:
    manifest = Manifest("demo", CONFIG, (HELLO,), measurement(CONFIG, Tree((HELLO,))), "t",
                        (DirRecord("tmp", 0o1777),), (LinkRecord("bin", "usr/bin"),))
    assert Manifest.from_json(manifest.to_json(), "x") == manifest
    tampered = manifest.to_json().replace(b'"sim"', b'"debug"')
    with pytest.raises(IntegrityError, match="mode 'debug' is not one of sim, hardware"):
        Manifest.from_json(tampered, "x")
    with pytest.raises(IntegrityError, match="unknown key 'extra'"):
        Manifest.from_json(manifest.to_json().replace(b'"format"', b'"extra": 1, "format"'), "x")


def test_sizes_names_and_host_paths() -> None:
    assert parse_size("40M", "heap") == 40 * 1024 * 1024
    assert parse_size("4k", "stack") == 4096
    assert parse_size("123", "heap") == 123
    with pytest.raises(UsageError, match="is not a size"):
        parse_size("40MB", "heap")
    assert check_name("copy_demo") == "copy_demo"
    for bad in ("Copy", "-x", ".x", "a" * 65, "a/b", ""):
        with pytest.raises(UsageError, match="is not valid"):
            check_name(bad)
    assert check_host_paths(["/usr/lib/python3*", "/usr/bin/python3/", "/usr/bin/python3"]) \
        == ("/usr/bin/python3", "/usr/lib/python3*")
    for bad in ("relative", "/", "/usr/../etc", "/a/$HOME"):
        with pytest.raises(UsageError):
            check_host_paths([bad])


@pytest.mark.parametrize("argv", [
    ("/copy_files",), ("/bin/x", "a b", "it's", 'say "hi"', ""), ("/p", "key:value", "#x"),
])
def test_entrypoints_round_trip_through_a_session_command(argv: tuple[str, ...]) -> None:
    assert tuple(split_command(join_command(argv))) == argv


def test_entrypoint_rules() -> None:
    assert parse_entrypoint("/usr/bin/python3 /app.py --x") == (
        "/usr/bin/python3", "/app.py", "--x")
    with pytest.raises(UsageError, match="must be an absolute path"):
        parse_entrypoint("copy_files")
    with pytest.raises(UsageError, match="contains '\\$'"):
        parse_entrypoint("/copy_files $HOME")
    with pytest.raises(UsageError, match="unclosed"):
        parse_entrypoint("/copy_files 'x")

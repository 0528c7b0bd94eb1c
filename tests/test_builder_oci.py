"""tdapp.builder.oci: container images unpacked into a root folder, and nothing outside it."""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import io
import json
import os
import stat
import tarfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from oci_images import (
    HOST_ARCH,
    Entry,
    LayerSpec,
    blob_path,
    layer_tar,
    manifest_of,
    write_docker_archive,
    write_docker_archives,
    write_oci_archive,
    write_oci_index,
    write_oci_layout,
)

from tdapp.builder import layers
from tdapp.builder.oci import ImageConfig, parse_reference, unpack_image
from tdapp.errors import InputError, IntegrityError, TdappError, UsageError

TOKEN = f"tdapp-oci-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
Tree = dict[str, tuple[Any, ...]]


def tree(root: Path) -> Tree:
    """Every entry under ``root``, never following a link: kind, mode, content or target."""
    found: Tree = {}

    def walk(folder: Path, prefix: str) -> None:
        for child in sorted(os.scandir(folder), key=lambda entry: entry.name):
            info = child.stat(follow_symlinks=False)
            relative = prefix + child.name
            if stat.S_ISDIR(info.st_mode):
                found[relative] = ("dir", stat.S_IMODE(info.st_mode))
                walk(Path(child.path), relative + "/")
            elif stat.S_ISLNK(info.st_mode):
                found[relative] = ("link", os.readlink(child.path))
            elif stat.S_ISREG(info.st_mode):
                found[relative] = ("file", stat.S_IMODE(info.st_mode),
                                   Path(child.path).read_bytes())
            else:
                found[relative] = ("other", info.st_mode)

    walk(root, "")
    return found


@pytest.fixture
def rootfs(tmp_path: Path) -> Path:
    path = tmp_path / "rootfs"
    path.mkdir()
    return path


def refused(error: pytest.ExceptionInfo[TdappError], *fragments: str) -> str:
    message = str(error.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


# --- Three formats, one image -------------------------------------------------------------

LAYERS: list[LayerSpec] = [
    [Entry("bin", "dir", mode=0o755),
     Entry("bin/busybox", data=b"BUSYBOX", mode=0o755),
     Entry("bin/sh", "symlink", target="/bin/busybox"),
     Entry("etc", "dir", mode=0o755),
     Entry("etc/passwd", data=b"root:x:0:0", mode=0o644),
     Entry("etc/shadow", data=b"", mode=0o400),
     Entry("usr/bin/su", data=b"SU", mode=0o4755),  # parents not listed; setuid
     Entry("tmp", "dir", mode=0o1777),
     Entry("ro", "dir", mode=0o555),
     Entry("./data/a.txt", data=b"a", mode=0o600)],
    [Entry("etc/alias", "symlink", target="passwd"),
     Entry("lib", "symlink", target="usr/lib"),
     Entry("usr/lib", "dir", mode=0o2755),  # setgid folder
     Entry("bin/ls", "hardlink", target="bin/busybox"),
     Entry("etc/passwd", data=b"root:x:0:0\nuser:x:1000:1000", mode=0o640),
     Entry("data/b.txt", data=b"b" * 70000, mode=0o644)],
    [Entry("data", "dir", mode=0o750),  # a folder over a folder keeps its children
     Entry("home/user/.profile", data=b"export A=1\n", mode=0o644)],
]
EXPECTED: Tree = {
    "bin": ("dir", 0o755),
    "bin/busybox": ("file", 0o755, b"BUSYBOX"),
    "bin/ls": ("file", 0o755, b"BUSYBOX"),
    "bin/sh": ("link", "/bin/busybox"),
    "data": ("dir", 0o750),
    "data/a.txt": ("file", 0o600, b"a"),
    "data/b.txt": ("file", 0o644, b"b" * 70000),
    "etc": ("dir", 0o755),
    "etc/alias": ("link", "passwd"),
    "etc/passwd": ("file", 0o640, b"root:x:0:0\nuser:x:1000:1000"),
    "etc/shadow": ("file", 0o400, b""),
    "home": ("dir", 0o755),
    "home/user": ("dir", 0o755),
    "home/user/.profile": ("file", 0o644, b"export A=1\n"),
    "lib": ("link", "usr/lib"),
    "ro": ("dir", 0o755),
    "tmp": ("dir", 0o1777),
    "usr": ("dir", 0o755),
    "usr/bin": ("dir", 0o755),
    "usr/bin/su": ("file", 0o755, b"SU"),
    "usr/lib": ("dir", 0o755),
}
CONFIG = {"config": {"Entrypoint": ["/bin/sh", "-c"], "Cmd": ["echo hi"],
                     "Env": ["PATH=/bin:/usr/bin", "A=b=c"], "WorkingDir": "/data",
                     "User": "1000:1000"}}
RUN = ImageConfig(("/bin/sh", "-c"), ("echo hi",), ("PATH=/bin:/usr/bin", "A=b=c"), "/data",
                  "1000:1000")
Writer = Callable[[Path, list[LayerSpec], dict[str, Any] | None], tuple[str, str]]


def oci(folder: Path, image: list[LayerSpec], config: dict[str, Any] | None) -> tuple[str, str]:
    return f"oci:{folder / 'layout'}", write_oci_layout(folder / "layout", image, config)


def oci_plain(folder: Path, image: list[LayerSpec],
              config: dict[str, Any] | None) -> tuple[str, str]:
    return (f"oci:{folder / 'layout'}:latest",
            write_oci_layout(folder / "layout", image, config, compress=False))


def oci_archive(folder: Path, image: list[LayerSpec],
                config: dict[str, Any] | None) -> tuple[str, str]:
    return f"oci-archive:{folder / 'image.tar'}", write_oci_archive(folder / "image.tar", image,
                                                                     config)


def docker(folder: Path, image: list[LayerSpec],
           config: dict[str, Any] | None) -> tuple[str, str]:
    return (f"docker-archive:{folder / 'image.tar'}",
            write_docker_archive(folder / "image.tar", image, config))


def docker_blobs(folder: Path, image: list[LayerSpec],
                 config: dict[str, Any] | None) -> tuple[str, str]:
    return (f"docker-archive:{folder / 'image.tar'}:example:latest",
            write_docker_archive(folder / "image.tar", image, config, blobs=True))


def docker_gzip(folder: Path, image: list[LayerSpec],
                config: dict[str, Any] | None) -> tuple[str, str]:
    """``docker save | gzip``: docker load takes it, so do we."""
    digest = write_docker_archive(folder / "plain.tar", image, config)
    (folder / "image.tar.gz").write_bytes(gzip.compress((folder / "plain.tar").read_bytes()))
    (folder / "plain.tar").unlink()
    return f"docker-archive:{folder / 'image.tar.gz'}", digest


WRITERS = {"oci": oci, "oci-plain": oci_plain, "oci-archive": oci_archive, "docker": docker,
           "docker-blobs": docker_blobs, "docker-gzip": docker_gzip}


@pytest.mark.parametrize("form", sorted(WRITERS))
def test_each_format_unpacks_the_image_exactly(form: str, tmp_path: Path, rootfs: Path) -> None:
    reference, digest = WRITERS[form](tmp_path, LAYERS, CONFIG)
    messages: list[str] = []
    image = unpack_image(reference, rootfs, messages.append)
    assert tree(rootfs) == EXPECTED
    busybox, ls = (os.lstat(rootfs / name) for name in ("bin/busybox", "bin/ls"))
    assert (busybox.st_ino, busybox.st_dev) == (ls.st_ino, ls.st_dev)
    assert image.reference == reference
    assert image.digest == digest
    assert image.layers == 3
    assert image.config == RUN
    assert len(messages) == 3
    assert messages[0].startswith("layer 1/3 sha256:") and messages[2].startswith("layer 3/3 ")


def test_the_docker_digest_is_the_config_digest(tmp_path: Path, rootfs: Path) -> None:
    digest = write_docker_archive(tmp_path / "image.tar", LAYERS, CONFIG)
    with tarfile.open(tmp_path / "image.tar") as archive:
        handle = archive.extractfile(f"{digest[7:]}.json")
        assert handle is not None
        assert hashlib.sha256(handle.read()).hexdigest() == digest[7:]


def test_a_config_without_settings_gives_empty_fields(tmp_path: Path, rootfs: Path) -> None:
    reference, _ = oci(tmp_path, [[Entry("a", data=b"x")]], None)
    assert unpack_image(reference, rootfs).config == ImageConfig((), (), (), "", "")


def test_progress_names_each_layer(tmp_path: Path, rootfs: Path) -> None:
    digest = write_oci_layout(tmp_path / "layout", LAYERS[:2])
    layer_digests = [item["digest"] for item in manifest_of(tmp_path / "layout",
                                                            digest)["layers"]]
    messages: list[str] = []
    unpack_image(f"oci:{tmp_path / 'layout'}", rootfs, messages.append)
    assert messages == [f"layer {i}/2 {d[:19]}…" for i, d in enumerate(layer_digests, 1)]


def test_empty_layers_unpack_to_nothing(tmp_path: Path, rootfs: Path) -> None:
    reference, _ = oci(tmp_path, [[], b"", [Entry("a", data=b"x")]], None)
    assert unpack_image(reference, rootfs).layers == 3
    assert tree(rootfs) == {"a": ("file", 0o644, b"x")}


# --- Choosing the image -------------------------------------------------------------------

def test_a_tag_chooses_among_images_of_a_layout(tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    write_oci_layout(layout, [[Entry("one", data=b"1")]], tag="one")
    two = write_oci_layout(layout, [[Entry("two", data=b"2")]], tag="two")
    (tmp_path / "r").mkdir()
    assert unpack_image(f"oci:{layout}:two", tmp_path / "r").digest == two
    assert tree(tmp_path / "r") == {"two": ("file", 0o644, b"2")}
    with pytest.raises(UsageError) as several:
        unpack_image(f"oci:{layout}", tmp_path / "r")
    refused(several, "2 images", "one, two")
    with pytest.raises(InputError) as unknown:
        unpack_image(f"oci:{layout}:three", tmp_path / "r")
    refused(unknown, "'three'", "one, two")


def test_a_tag_chooses_among_images_of_a_docker_archive(tmp_path: Path, rootfs: Path) -> None:
    archive = tmp_path / "images.tar"
    _, b = write_docker_archives(archive, [("a:latest", [[Entry("a", data=b"A")]], None),
                                           ("b:latest", [[Entry("b", data=b"B")]], None)])
    assert unpack_image(f"docker-archive:{archive}:b:latest", rootfs).digest == b
    assert tree(rootfs) == {"b": ("file", 0o644, b"B")}
    with pytest.raises(UsageError) as several:
        unpack_image(f"docker-archive:{archive}", rootfs)
    refused(several, "a:latest, b:latest")
    with pytest.raises(InputError) as unknown:
        unpack_image(f"docker-archive:{archive}:c:latest", rootfs)
    refused(unknown, "'c:latest'")


def test_a_multi_platform_index_gives_the_hosts_image(tmp_path: Path, rootfs: Path) -> None:
    digests = write_oci_index(tmp_path / "layout", {
        "riscv64": [[Entry("arch", data=b"riscv64")]],
        HOST_ARCH: [[Entry("arch", data=HOST_ARCH.encode())]]})
    image = unpack_image(f"oci:{tmp_path / 'layout'}:latest", rootfs)
    assert image.digest == digests[HOST_ARCH]
    assert tree(rootfs) == {"arch": ("file", 0o644, HOST_ARCH.encode())}
    write_oci_index(tmp_path / "other", {"riscv64": [[]], "s390x": [[]]})
    with pytest.raises(InputError) as missing:
        unpack_image(f"oci:{tmp_path / 'other'}", rootfs)
    refused(missing, f"linux/{HOST_ARCH}", "linux/riscv64, linux/s390x")


# --- Whiteouts and replacement ------------------------------------------------------------

def test_whiteouts_and_replacements_across_layers(tmp_path: Path, rootfs: Path) -> None:
    reference, _ = oci(tmp_path, [
        [Entry("a/x", data=b"x"), Entry("a/y", data=b"y"),
         Entry("d", "dir", mode=0o700), Entry("d/old", data=b"old"),
         Entry("d/sub/deep", data=b"deep"),
         Entry("f", data=b"file"),
         Entry("g/in", data=b"in"), Entry("g/sub/in", data=b"in"),
         Entry("s", "symlink", target="a")],
        [Entry("d/new", data=b"new"),  # before the opaque marker: the layer's own child stays
         Entry("a/.wh.x"), Entry("d/.wh..wh..opq"), Entry(".wh.nothing-here"),
         Entry("f", "dir", mode=0o755),  # a file replaced by a folder
         Entry("f/inside", data=b"inside"),
         Entry("g", data=b"now a file"),  # a folder tree replaced by a file
         Entry("s", "dir", mode=0o755)],  # a link replaced by a folder
    ], None)
    unpack_image(reference, rootfs)
    assert tree(rootfs) == {
        "a": ("dir", 0o755), "a/y": ("file", 0o644, b"y"),
        "d": ("dir", 0o700), "d/new": ("file", 0o644, b"new"),
        "f": ("dir", 0o755), "f/inside": ("file", 0o644, b"inside"),
        "g": ("file", 0o644, b"now a file"),
        "s": ("dir", 0o755)}


def test_a_whiteout_of_a_folder_removes_its_tree(tmp_path: Path, rootfs: Path) -> None:
    reference, _ = oci(tmp_path, [
        [Entry("keep", data=b"k"), Entry("gone/a/b", data=b"b"), Entry("gone/c", "symlink",
                                                                       target="/keep")],
        [Entry(".wh.gone")],
        [Entry("gone", data=b"back as a file")]], None)
    unpack_image(reference, rootfs)
    assert tree(rootfs) == {"keep": ("file", 0o644, b"k"),
                            "gone": ("file", 0o644, b"back as a file")}


# --- Hostile layers -----------------------------------------------------------------------

def hostile_cases(sentinel: Path) -> dict[str, tuple[list[LayerSpec], tuple[str, ...]]]:
    """{case: (layers, fragments the refusal must hold)}; each would escape if obeyed."""
    out = f"../{TOKEN}"
    return {
        "dotdot": ([[Entry(out, data=b"x")]], (repr(out), "'..'")),
        "dotdot-inner": ([[Entry(f"a/../../{TOKEN}", data=b"x")]], ("'..'",)),
        "absolute": ([[Entry(f"/etc/{TOKEN}", data=b"x")]], ("absolute path",)),
        "symlink-climbs": ([[Entry("x", "symlink", target="../../../etc/passwd")]],
                           ("'x'", "leads out of the image root")),
        "symlink-climbs-from-folder": ([[Entry("a/evil", "symlink",
                                               target="../../etc/passwd")]],
                                       ("'a/evil'", "leads out")),
        "absolute-symlink-climbs": ([[Entry("x", "symlink", target="/../etc/passwd")]],
                                    ("leads out",)),
        "write-through-etc": ([[Entry("d", "symlink", target="/etc")],
                               [Entry(f"d/{TOKEN}", data=b"x")]],
                              (f"'d/{TOKEN}'", "written through the symbolic link 'd'")),
        "write-through-same-layer": ([[Entry("d", "symlink", target=str(sentinel)),
                                       Entry(f"d/{TOKEN}", data=b"x")]],
                                     ("symbolic link 'd'",)),
        "folder-through-link": ([[Entry("d", "symlink", target=str(sentinel))],
                                 [Entry("d/sub", "dir", mode=0o777)]],
                                ("symbolic link 'd'",)),
        "deep-write-through": ([[Entry("a/b", "symlink", target=str(sentinel))],
                                [Entry(f"a/b/c/{TOKEN}", data=b"x")]],
                               ("symbolic link 'a/b'",)),
        "hardlink-absolute": ([[Entry("h", "hardlink", target="/etc/passwd")]],
                              ("'h'", "hard link to '/etc/passwd'", "absolute path")),
        "hardlink-dotdot": ([[Entry("h", "hardlink", target="../outside")]],
                            ("hard link to '../outside'", "'..'")),
        "hardlink-through-link": ([[Entry("d", "symlink", target=str(sentinel))],
                                   [Entry("h", "hardlink", target="d/keep")]],
                                  ("'h'", "symbolic link 'd'")),
        "hardlink-to-link": ([[Entry("s", "symlink", target=str(sentinel / "keep")),
                               Entry("h", "hardlink", target="s")]],
                             ("not a regular file",)),
        "hardlink-to-nothing": ([[Entry("h", "hardlink", target="missing")]],
                                ("not a regular file unpacked before it",)),
        "chardev": ([[Entry("dev/null", "chardev", mode=0o666)]],
                    ("'dev/null'", "device node", "only files, folders and links")),
        "blockdev": ([[Entry("dev/sda", "blockdev")]], ("'dev/sda'", "device node")),
        "fifo": ([[Entry("pipe", "fifo")]], ("'pipe'", "FIFO")),
        "whiteout-dotdot": ([[Entry(".wh.../../x")]], ("'.wh.../../x'", "'..'")),
        "whiteout-of-dotdot": ([[Entry("a/.wh...")]], ("whiteout",)),
        "whiteout-through-link": ([[Entry("d", "symlink", target=str(sentinel))],
                                   [Entry("d/.wh.keep")]],
                                  ("'d/.wh.keep'", "removed through the symbolic link 'd'")),
        "opaque-through-link": ([[Entry("d", "symlink", target=str(sentinel))],
                                 [Entry("d/.wh..wh..opq")]], ("symbolic link 'd'",)),
        "long-name": ([[Entry("a" * 200 + "/" + "b" * 3900, data=b"x")]],
                      ("longer than 4096 bytes",)),
    }


CASES = sorted(hostile_cases(Path("/unused")))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("form", ["oci", "docker"])
@pytest.mark.parametrize("case", CASES)
def test_hostile_layers_are_refused_and_nothing_escapes(case: str, form: str,
                                                        tmp_path: Path, rootfs: Path) -> None:
    sentinel = tmp_path / "sentinel"
    sentinel.mkdir(mode=0o755)
    (sentinel / "keep").write_bytes(b"keep")
    image, fragments = hostile_cases(sentinel)[case]
    (tmp_path / "image").mkdir()
    reference, _ = WRITERS[form](tmp_path / "image", image, None)
    before = {key: value for key, value in tree(tmp_path).items()
              if not key.startswith("rootfs")}
    passwd = _sha(Path("/etc/passwd"))
    try:
        with pytest.raises(IntegrityError) as error:
            unpack_image(reference, rootfs)
        refused(error, *fragments)
        assert "refused" in str(error.value)
        after = {key: value for key, value in tree(tmp_path).items()
                 if not key.startswith("rootfs")}
        assert after == before
        assert not os.path.lexists(f"/etc/{TOKEN}")
        assert not os.path.lexists(f"/{TOKEN}")
        assert _sha(Path("/etc/passwd")) == passwd
    finally:
        for stray in (f"/etc/{TOKEN}", f"/{TOKEN}"):
            if os.path.lexists(stray):
                os.unlink(stray)


def test_a_link_to_outside_may_be_replaced_without_touching_its_target(
        tmp_path: Path, rootfs: Path) -> None:
    sentinel = tmp_path / "sentinel"
    sentinel.mkdir(mode=0o750)
    (sentinel / "keep").write_bytes(b"keep")
    reference, _ = oci(tmp_path, [
        [Entry("f", "symlink", target=str(sentinel / "keep")),
         Entry("d", "symlink", target=str(sentinel))],
        [Entry("f", data=b"mine", mode=0o777), Entry("d", "dir", mode=0o777),
         Entry("d/keep", data=b"mine too")]], None)
    unpack_image(reference, rootfs)
    assert tree(sentinel) == {"keep": ("file", 0o644, b"keep")}
    assert stat.S_IMODE(sentinel.stat().st_mode) == 0o750
    assert tree(rootfs) == {"f": ("file", 0o777, b"mine"), "d": ("dir", 0o777),
                            "d/keep": ("file", 0o644, b"mine too")}


def test_nothing_is_written_before_a_hostile_entry_is_found(tmp_path: Path,
                                                            rootfs: Path) -> None:
    reference, _ = oci(tmp_path, [[Entry("good", data=b"x"), Entry("bad", "fifo")]], None)
    with pytest.raises(IntegrityError):
        unpack_image(reference, rootfs)
    assert tree(rootfs) == {}


def test_the_entry_limit(tmp_path: Path, rootfs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(layers, "MAX_ENTRIES", 3)
    reference, _ = oci(tmp_path, [[Entry("a"), Entry("b")], [Entry("c"), Entry("d")]], None)
    with pytest.raises(IntegrityError) as error:
        unpack_image(reference, rootfs)
    refused(error, "layer 2", "more than 3 entries")


def test_the_size_limit(tmp_path: Path, rootfs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(layers, "MAX_UNPACKED_BYTES", 64 * 1024)
    reference, _ = oci(tmp_path, [[Entry("a", data=bytes(40000))],
                                  [Entry("b", data=bytes(40000))]], None)
    with pytest.raises(IntegrityError) as error:
        unpack_image(reference, rootfs)
    refused(error, "layer 2", "more than 65536 bytes")
    assert set(tree(rootfs)) == {"a"}


def test_an_over_long_pax_header_is_refused(tmp_path: Path, rootfs: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(layers, "MAX_HEADER_BYTES", 1000)
    reference, _ = oci(tmp_path, [[Entry("a" * 2000, data=b"x")]], None)
    with pytest.raises(IntegrityError) as error:
        unpack_image(reference, rootfs)
    refused(error, "extended header")


# --- Integrity ----------------------------------------------------------------------------

def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("offset", [0, 4, 20, -1, -6])
def test_a_changed_layer_blob_is_refused_before_anything_is_written(
        offset: int, tmp_path: Path, rootfs: Path) -> None:
    layout = tmp_path / "layout"
    digest = write_oci_layout(layout, [[Entry("a", data=os.urandom(3000))]])
    layer = manifest_of(layout, digest)["layers"][0]["digest"]
    _flip(blob_path(layout, layer), offset)
    with pytest.raises(IntegrityError) as error:
        unpack_image(f"oci:{layout}", rootfs)
    refused(error, "layer 1", layer)
    assert tree(rootfs) == {}


@pytest.mark.parametrize("blob", ["config", "manifest"])
def test_a_changed_config_or_manifest_is_refused(blob: str, tmp_path: Path,
                                                 rootfs: Path) -> None:
    layout = tmp_path / "layout"
    digest = write_oci_layout(layout, LAYERS, CONFIG)
    target = digest if blob == "manifest" else manifest_of(layout, digest)["config"]["digest"]
    _flip(blob_path(layout, target), 10)
    with pytest.raises(IntegrityError) as error:
        unpack_image(f"oci:{layout}", rootfs)
    refused(error, blob, target)
    assert tree(rootfs) == {}


def test_a_wrong_size_in_a_descriptor_is_refused(tmp_path: Path, rootfs: Path) -> None:
    layout = tmp_path / "layout"
    write_oci_layout(layout, LAYERS)
    index = json.loads((layout / "index.json").read_bytes())
    index["manifests"][0]["size"] += 1
    (layout / "index.json").write_text(json.dumps(index))
    with pytest.raises(IntegrityError) as error:
        unpack_image(f"oci:{layout}", rootfs)
    refused(error, "descriptor says")


@pytest.mark.parametrize("form", ["oci", "docker"])
def test_a_wrong_diff_id_is_refused(form: str, tmp_path: Path, rootfs: Path) -> None:
    wrong = "sha256:" + "0" * 64
    reference, _ = WRITERS[form](tmp_path, [[Entry("a", data=b"x")]],
                                 {"rootfs": {"type": "layers", "diff_ids": [wrong]}})
    with pytest.raises(IntegrityError) as error:
        unpack_image(reference, rootfs)
    refused(error, "layer 1", "diff_id", wrong)
    assert tree(rootfs) == {}


def test_a_wrong_number_of_diff_ids_is_refused(tmp_path: Path, rootfs: Path) -> None:
    reference, _ = oci(tmp_path, [[Entry("a")], [Entry("b")]],
                       {"rootfs": {"type": "layers", "diff_ids": ["sha256:" + "0" * 64]}})
    with pytest.raises(IntegrityError) as error:
        unpack_image(reference, rootfs)
    refused(error, "1 diff_ids for 2 layers")


def test_a_changed_docker_layer_is_refused(tmp_path: Path, rootfs: Path) -> None:
    archive = tmp_path / "image.tar"
    write_docker_archive(archive, [[Entry("a", data=b"a" * 100)]])
    with tarfile.open(archive) as outer:
        member = next(m for m in outer.getmembers() if m.name.endswith("/layer.tar"))
    _flip(archive, member.offset_data + 512 + 5)  # a byte of file a's content
    with pytest.raises(IntegrityError) as error:
        unpack_image(f"docker-archive:{archive}", rootfs)
    refused(error, "diff_id")
    assert tree(rootfs) == {}


def _rewrite(archive: Path, name: str, data: bytes) -> None:
    """Replace member ``name`` of a tar with ``data``, keeping every other member."""
    with tarfile.open(archive) as source:
        members = [(info, source.extractfile(info)) for info in source.getmembers()]
        contents = [(info, handle.read() if handle else b"") for info, handle in members]
    with tarfile.open(archive, "w") as target:
        for info, content in contents:
            if info.name == name:
                content, info.size = data, len(data)
            target.addfile(info, io.BytesIO(content))


def test_a_docker_config_unlike_its_name_is_refused(tmp_path: Path, rootfs: Path) -> None:
    archive = tmp_path / "image.tar"
    digest = write_docker_archive(archive, [[Entry("a")]], CONFIG)
    _rewrite(archive, f"{digest[7:]}.json", json.dumps({"config": {"User": "0"}}).encode())
    with pytest.raises(IntegrityError) as error:
        unpack_image(f"docker-archive:{archive}", rootfs)
    refused(error, "does not match the digest in its name")


def test_a_changed_docker_blob_is_refused_by_its_name(tmp_path: Path, rootfs: Path) -> None:
    archive = tmp_path / "image.tar"
    reference, _ = docker_blobs(tmp_path, [[Entry("a", data=b"x")]], None)
    # The blob's name is its digest: checked first, before the config's diff_id.
    layer = layer_tar([Entry("a", data=b"y")], compress=False)
    with tarfile.open(archive) as source:
        name = next(m.name for m in source.getmembers()
                    if m.name.startswith("blobs/") and m.size == len(layer))
    _rewrite(archive, name, layer)
    with pytest.raises(IntegrityError) as error:
        unpack_image(reference, rootfs)
    refused(error, "layer 1", "sha256:" + name.rsplit("/", 1)[1])
    assert tree(rootfs) == {}


def test_a_docker_archive_without_diff_ids_is_refused(tmp_path: Path, rootfs: Path) -> None:
    archive = tmp_path / "image.tar"
    write_docker_archive(archive, [[Entry("a")]], {"rootfs": None})
    with pytest.raises(InputError) as error:
        unpack_image(f"docker-archive:{archive}", rootfs)
    refused(error, "diff_ids")


# --- Outer archives -----------------------------------------------------------------------

def test_hostile_members_of_an_outer_archive_are_never_written(tmp_path: Path,
                                                               rootfs: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    digest = write_oci_archive(images / "image.tar", LAYERS, CONFIG, extra=[
        Entry(f"../{TOKEN}", data=b"escape"), Entry(f"/tmp/{TOKEN}", data=b"escape"),
        Entry("link", "symlink", target="/etc"), Entry(f"link/{TOKEN}", data=b"escape"),
        Entry("dev", "chardev")])
    before = tree(tmp_path)
    image = unpack_image(f"oci-archive:{images / 'image.tar'}", rootfs)
    assert image.digest == digest
    assert tree(rootfs) == EXPECTED
    assert {k: v for k, v in tree(tmp_path).items() if not k.startswith("rootfs/")} == before
    for stray in (f"/etc/{TOKEN}", f"/tmp/{TOKEN}", str(tmp_path.parent / TOKEN)):
        assert not os.path.lexists(stray)


def test_a_member_named_twice_is_refused(tmp_path: Path, rootfs: Path) -> None:
    archive = tmp_path / "image.tar"
    write_oci_archive(archive, LAYERS, extra=[Entry("./index.json", data=b"{}")])
    with pytest.raises(InputError) as error:
        unpack_image(f"oci-archive:{archive}", rootfs)
    refused(error, "'index.json' twice")


# --- Bad input ----------------------------------------------------------------------------

def test_references_are_parsed() -> None:
    assert parse_reference("oci:/x/y") == ("oci", Path("/x/y"), None)
    assert parse_reference("oci:rel:v1") == ("oci", Path("rel"), "v1")
    assert parse_reference("oci-archive:a.tar:t") == ("oci-archive", Path("a.tar"), "t")
    assert parse_reference("docker-archive:a.tar:repo/x:1.0") == (
        "docker-archive", Path("a.tar"), "repo/x:1.0")


@pytest.mark.parametrize("reference", ["nope:x", "oci:", "oci:dir:", "docker-archive:",
                                       "just-a-path", "docker://alpine", "OCI:dir"])
def test_malformed_references_are_usage_errors(reference: str, rootfs: Path) -> None:
    with pytest.raises(UsageError) as error:
        unpack_image(reference, rootfs)
    refused(error, repr(reference))


def test_missing_and_unusable_images_are_input_errors(tmp_path: Path, rootfs: Path) -> None:
    (tmp_path / "text.tar").write_text("this is not a tar archive\n" * 100)
    (tmp_path / "empty-layout").mkdir()
    with tarfile.open(tmp_path / "other.tar", "w") as archive:
        archive.add(tmp_path / "text.tar", arcname="something")
    cases = {
        f"oci:{tmp_path / 'missing'}": "is not a folder",
        f"docker-archive:{tmp_path / 'missing.tar'}": "does not exist",
        f"oci-archive:{tmp_path / 'missing.tar'}": "does not exist",
        f"docker-archive:{tmp_path / 'text.tar'}": "not a tar archive",
        f"oci-archive:{tmp_path / 'empty-layout'}": "cannot be read",
        f"oci:{tmp_path / 'empty-layout'}": "oci-layout is missing",
        f"docker-archive:{tmp_path / 'other.tar'}": "no file 'manifest.json'",
        f"oci-archive:{tmp_path / 'other.tar'}": "no file 'oci-layout'",
    }
    for reference, fragment in cases.items():
        with pytest.raises(InputError) as error:
            unpack_image(reference, rootfs)
        refused(error, fragment)


@pytest.mark.parametrize(("config", "fragment"), [
    (b"[1, 2]", "not a JSON object"),
    (b"{not json", "not valid JSON"),
    ({"config": {"Entrypoint": "/bin/sh"}}, "Entrypoint is not a list of strings"),
    ({"config": {"Env": ["A=1", 2]}}, "Env is not a list of strings"),
    ({"config": {"WorkingDir": 3}}, "WorkingDir is not a string"),
    ({"config": []}, "not a JSON object"),
])
def test_bad_configs_are_input_errors(config: dict[str, Any] | bytes, fragment: str,
                                      tmp_path: Path, rootfs: Path) -> None:
    write_oci_layout(tmp_path / "layout", [[Entry("a")]], config)
    with pytest.raises(InputError) as error:
        unpack_image(f"oci:{tmp_path / 'layout'}", rootfs)
    refused(error, fragment)


def test_a_layer_that_is_not_a_tar_is_an_input_error(tmp_path: Path, rootfs: Path) -> None:
    reference, _ = oci(tmp_path, [b"\x1f\x8bnot really gzip" * 10], None)
    with pytest.raises(InputError) as error:
        unpack_image(reference, rootfs)
    refused(error, "layer 1", "not a valid gzip tar")


@pytest.mark.skipif(importlib.util.find_spec("zstandard") is not None,
                    reason="zstandard is installed, so zstd layers are supported")
def test_a_zstd_layer_is_refused_naming_zstd(tmp_path: Path, rootfs: Path) -> None:
    reference, _ = oci(tmp_path, [b"\x28\xb5\x2f\xfd" + layer_tar([Entry("a")])], None)
    with pytest.raises(InputError) as error:
        unpack_image(reference, rootfs)
    refused(error, "layer 1", "zstd", "zstandard")


def test_the_root_folder_must_be_empty(tmp_path: Path, rootfs: Path) -> None:
    reference, _ = oci(tmp_path, [[Entry("a")]], None)
    (rootfs / "already").write_bytes(b"")
    with pytest.raises(InputError) as error:
        unpack_image(reference, rootfs)
    refused(error, "not empty")

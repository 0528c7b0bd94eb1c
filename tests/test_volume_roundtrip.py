"""create -> extract and create -> add -> extract give back exactly the trees that went in."""

from __future__ import annotations

import json
import os
import random
import stat
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import CliResult, snapshot, write_tree
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from tdapp.errors import InputError, IntegrityError
from tdapp.volume import RegionKind, RegionMap, Volume, VolumeKey

C = 64  # a small chunk size, so chunk boundaries are cheap to reach
SIZES = [0, 1, C - 1, C, C + 1, 2 * C - 1, 2 * C, 2 * C + 1, 3 * C]
DIR_MODES = [0o700, 0o711, 0o750, 0o755, 0o777]

# -- the model of a tree --------------------------------------------------------------------


@dataclass(frozen=True)
class FileSpec:
    size: int
    seed: int
    mode: int

    def content(self) -> bytes:
        return random.Random(self.seed).randbytes(self.size)


@dataclass(frozen=True)
class DirSpec:
    entries: dict[str, FileSpec | DirSpec]
    mode: int


# Every name a volume holds: no "/", no control characters (Cc), no line or paragraph
# separators (Zl, Zp), no bidirectional controls (refused, see test_attack_volume.py).
_BIDI_CONTROLS = "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
_chars = st.characters(codec="utf-8", exclude_categories=("Cc", "Cs", "Zl", "Zp"),
                       exclude_characters="/" + _BIDI_CONTROLS)
names = st.one_of(
    st.text(_chars, min_size=1, max_size=8),
    st.text(_chars, min_size=40, max_size=63),  # at most 63 * 4 = 252 bytes
    st.sampled_from(["a", "A", ".hidden", "with space", "ünïcödé", "日本語", "🔑", "x" * 255,
                     "é" * 127 + "x", "name (1)", "-dash", "=eq"]),
).filter(lambda name: name not in (".", "..") and len(name.encode()) <= 255)

file_specs = st.builds(
    FileSpec,
    size=st.one_of(st.sampled_from(SIZES), st.integers(0, 4 * C)),
    seed=st.integers(0, 2**32),
    mode=st.integers(0o400, 0o777),
)


def _dirs(children: st.SearchStrategy[FileSpec | DirSpec]) -> st.SearchStrategy[DirSpec]:
    return st.builds(DirSpec, entries=st.dictionaries(names, children, max_size=4),
                     mode=st.sampled_from(DIR_MODES))


short_names = st.text(_chars,
                      min_size=1, max_size=10).filter(lambda name: name not in (".", ".."))


@st.composite
def trees(draw: st.DrawFn) -> DirSpec:
    """A root folder: nested folders (some empty) and files, plus one deep chain."""
    top = draw(st.dictionaries(names, st.recursive(file_specs, _dirs, max_leaves=10),
                               max_size=6))
    depth = draw(st.integers(0, 12))
    if depth:
        chain: FileSpec | DirSpec = draw(st.one_of(file_specs, st.just(DirSpec({}, 0o755))))
        for name in reversed(draw(st.lists(short_names, min_size=depth, max_size=depth))):
            chain = DirSpec({name: chain}, draw(st.sampled_from(DIR_MODES)))
        top.setdefault("deep", chain)
    tree = DirSpec(top, 0o755)
    assume(_longest_path(tree) <= 3000)  # stay clear of PATH_MAX with the temp prefix
    return tree


def _longest_path(spec: FileSpec | DirSpec) -> int:
    if isinstance(spec, FileSpec):
        return 0
    return max((len(name.encode()) + 1 + _longest_path(child)
                for name, child in spec.entries.items()), default=0)


def materialize(spec: DirSpec, root: Path) -> None:
    """Write the tree under ``root`` (which must exist), with the modes of the spec."""
    for name, child in spec.entries.items():
        path = root / name
        if isinstance(child, FileSpec):
            path.write_bytes(child.content())
            os.chmod(path, child.mode)
        else:
            path.mkdir()
            materialize(child, path)
            os.chmod(path, child.mode)


def file_paths(spec: DirSpec, prefix: str = "") -> list[str]:
    paths: list[str] = []
    for name, child in sorted(spec.entries.items()):
        path = f"{prefix}{name}"
        if isinstance(child, FileSpec):
            paths.append(path)
        else:
            paths.extend(file_paths(child, path + "/"))
    return paths


def metadata(root: Path) -> dict[str, int]:
    """mtime_ns of every entry, which extraction restores too."""
    return {path.relative_to(root).as_posix(): path.lstat().st_mtime_ns
            for path in root.rglob("*")}


def assert_same_tree(expected: Path, actual: Path) -> None:
    assert snapshot(actual) == snapshot(expected)  # paths, kinds, modes, bytes: exactly
    assert metadata(actual) == metadata(expected)


HYPOTHESIS = settings(max_examples=30, deadline=None,
                      suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                             HealthCheck.filter_too_much])


# -- property tests -----------------------------------------------------------------------


@HYPOTHESIS
@given(tree=trees(), chunk_size=st.sampled_from([16, C]))
def test_create_extract_roundtrip(tmp_path_factory: pytest.TempPathFactory, tree: DirSpec,
                                  chunk_size: int) -> None:
    with tempfile.TemporaryDirectory(dir=tmp_path_factory.getbasetemp()) as scratch:
        base = Path(scratch)
        source = base / "src"
        source.mkdir()
        materialize(tree, source)
        key = VolumeKey.generate()
        volume = Volume.create(base / "vol", key, source=source, chunk_size=chunk_size)
        stored = sorted(os.listdir(base / "vol" / "objects"))
        assert len(stored) == len(file_paths(tree))  # one object per file, empty ones too

        opened = Volume.open(base / "vol", key, volume.tag)
        assert opened.verify().files == len(file_paths(tree))
        opened.extract(base / "out")
        assert_same_tree(source, base / "out")


@st.composite
def tree_and_update(draw: st.DrawFn) -> tuple[DirSpec, dict[str, FileSpec], DirSpec]:
    """A first tree, new versions of some of its files, and a new subtree to add."""
    first = draw(trees())
    existing = file_paths(first)
    replaced_paths = draw(st.lists(st.sampled_from(existing), unique=True)) if existing else []
    replaced = {path: draw(file_specs) for path in replaced_paths}
    added = draw(_dirs(st.recursive(file_specs, _dirs, max_leaves=6)))
    return first, replaced, added


def _with_replacements(tree: DirSpec, replaced: dict[str, FileSpec]) -> DirSpec:
    """The subset of ``tree`` holding only the replaced files (with their folders' modes)."""
    entries: dict[str, FileSpec | DirSpec] = {}
    for name, child in tree.entries.items():
        if isinstance(child, FileSpec):
            if name in replaced:
                entries[name] = replaced[name]
        else:
            inner = {path.partition("/")[2]: spec for path, spec in replaced.items()
                     if path.partition("/")[0] == name and "/" in path}
            if inner:
                entries[name] = _with_replacements(child, inner)
    return DirSpec(entries, tree.mode)


@HYPOTHESIS
@given(case=tree_and_update())
def test_add_replaces_and_adds(tmp_path_factory: pytest.TempPathFactory,
                               case: tuple[DirSpec, dict[str, FileSpec], DirSpec]) -> None:
    first, replaced, added = case
    with tempfile.TemporaryDirectory(dir=tmp_path_factory.getbasetemp()) as scratch:
        base = Path(scratch)
        source1, source2 = base / "src1", base / "src2"
        source1.mkdir()
        source2.mkdir()
        materialize(first, source1)
        new_name = "added-✚"
        while new_name in first.entries:
            new_name += "_"
        update = _with_replacements(first, replaced)
        update.entries[new_name] = added
        materialize(update, source2)

        key = VolumeKey.generate()
        old_tag = Volume.create(base / "vol", key, source=source1, chunk_size=C).tag
        new_tag = Volume.open(base / "vol", key, old_tag).add(source2)
        assert new_tag != old_tag

        with pytest.raises(IntegrityError, match=r"tag mismatch \(rollback or tampering\)"):
            Volume.open(base / "vol", key, old_tag)

        opened = Volume.open(base / "vol", key, new_tag)
        opened.extract(base / "out")
        expected = {**snapshot(source1), **snapshot(source2)}
        assert snapshot(base / "out") == expected
        for path, spec in replaced.items():
            assert (base / "out" / path).read_bytes() == spec.content()
        # Replaced versions are gone from objects/: one stored object per file.
        files = sum(1 for value in expected.values() if value[0] == "file")
        assert len(os.listdir(base / "vol" / "objects")) == files
        assert opened.verify().files == files


# -- fixed cases ------------------------------------------------------------------------


def test_chunk_boundaries_and_empty_tree(tmp_path: Path) -> None:
    files = {f"size-{size}": random.randbytes(size) for size in (0, 1, C - 1, C, C + 1, 2 * C)}
    source = write_tree(tmp_path / "src", {**files, "empty-dir": None, "a/b/c/d": None})
    key = VolumeKey.generate()
    volume = Volume.create(tmp_path / "vol", key, source=source, chunk_size=C)
    sizes = {name: (tmp_path / "vol" / "objects" / name).stat().st_size
             for name in os.listdir(tmp_path / "vol" / "objects")}
    # Each chunk carries a 16-byte tag; an empty file still has one (empty) chunk.
    assert sorted(sizes.values()) == sorted([16, 17, C - 1 + 16, C + 16, C + 1 + 32, 2 * C + 32])
    volume.extract(tmp_path / "out")
    assert snapshot(tmp_path / "out") == snapshot(source)

    empty = Volume.create(tmp_path / "vol2", key)
    assert os.listdir(tmp_path / "vol2" / "objects") == []
    empty.extract(tmp_path / "out2")
    assert os.listdir(tmp_path / "out2") == []


REGION_FILES = {
    "secret/a.txt": b"secret content " * 10,
    "signed/b.txt": b"authenticated content " * 10,
    "signed/empty": b"",
    "logs/c.log": b"not protected content " * 10,
    "logs/sub/d.log": b"deep plain",
    "top.txt": b"top level, encrypted by default",
}


def test_regions_roundtrip(tmp_path: Path, cli: Callable[..., CliResult]) -> None:
    source = write_tree(tmp_path / "src", REGION_FILES)
    os.chmod(source / "logs" / "c.log", 0o640)
    result = cli("volume", "create", tmp_path / "vol", "--from", source,
                 "--region", "/signed=authenticated", "--region", "/logs=not-protected",
                 "--chunk-size", "32", "--envar-output")
    assert result.code == 0, result.err
    env = dict(line.removeprefix("export ").split("=", 1) for line in result.out.splitlines())
    key, tag = env["VOLUME_KEY"], env["VOLUME_TAG"]

    vol = tmp_path / "vol"
    # not-protected files are stored as they are, in plain/
    assert (vol / "plain" / "logs" / "c.log").read_bytes() == REGION_FILES["logs/c.log"]
    assert stat.S_IMODE((vol / "plain" / "logs" / "c.log").stat().st_mode) == 0o640
    # authenticated payloads are stored in clear (followed by tags); encrypted ones are not
    blobs = [(vol / "objects" / name).read_bytes() for name in os.listdir(vol / "objects")]
    assert len(blobs) == 4
    assert any(blob.startswith(b"authenticated content") for blob in blobs)
    assert not any(b"secret content" in blob for blob in blobs)

    shown = cli("volume", "show", vol, "--key", key, "--tag", tag, "--json")
    assert shown.code == 0, shown.err
    document = json.loads(shown.out)
    assert {f["path"]: f["region"] for f in document["files"]} == {
        "secret/a.txt": "encrypted", "signed/b.txt": "authenticated",
        "signed/empty": "authenticated", "top.txt": "encrypted",
        "logs/c.log": "not-protected", "logs/sub/d.log": "not-protected"}

    assert cli("volume", "verify", vol, "--key", key, "--tag", tag).code == 0
    result = cli("volume", "extract", vol, tmp_path / "out", "--key", key, "--tag", tag)
    assert result.code == 0, result.err
    assert snapshot(tmp_path / "out") == snapshot(source)


def test_not_protected_region_nested_in_encrypted_folder(tmp_path: Path) -> None:
    """A not-protected region below an encrypted folder (``a/logs`` with ``a`` encrypted).

    ``create`` accepts it and writes ``plain/a/logs/x``; the folder ``plain/a`` that this
    implies must not be mistaken for a file smuggled into the encrypted region ``a``.
    """
    source = write_tree(tmp_path / "src", {"a/secret.txt": b"s" * 100, "a/logs/x.log": b"log"})
    key = VolumeKey.generate()
    regions = RegionMap.build([("a/logs", RegionKind.NOT_PROTECTED)])
    volume = Volume.create(tmp_path / "vol", key, source=source, regions=regions, chunk_size=C)
    assert (tmp_path / "vol" / "plain" / "a" / "logs" / "x.log").read_bytes() == b"log"
    opened = Volume.open(tmp_path / "vol", key, volume.tag)
    opened.verify()
    opened.extract(tmp_path / "out")
    assert snapshot(tmp_path / "out") == snapshot(source)


def test_cli_add_roundtrip(tmp_path: Path, cli: Callable[..., CliResult]) -> None:
    first = write_tree(tmp_path / "one", {"keep.txt": b"keep", "change.txt": b"old " * 40})
    second = write_tree(tmp_path / "two", {"change.txt": b"new " * 50, "more/new.txt": b"+"})
    vol = tmp_path / "vol"
    created = cli("volume", "create", vol, "--from", first, "--chunk-size", "64")
    assert created.code == 0, created.err
    key_line, tag_line = created.out.splitlines()
    key, old_tag = key_line.removeprefix("key: "), tag_line.removeprefix("tag: ")

    added = cli("volume", "add", vol, second, "--key", key, "--tag", old_tag, "--envar-output")
    assert added.code == 0, added.err
    assert added.out.splitlines()[0] == f"export VOLUME_KEY={key}"
    new_tag = added.out.splitlines()[1].removeprefix("export VOLUME_TAG=")
    assert new_tag != old_tag

    stale = cli("volume", "verify", vol, "--key", key, "--tag", old_tag)
    assert stale.code == 4
    assert "tag mismatch" in stale.err
    again = cli("volume", "add", vol, second, "--key", key, "--tag", old_tag)
    assert again.code == 4

    result = cli("volume", "extract", vol, tmp_path / "out", "--key", key, "--tag", new_tag)
    assert result.code == 0, result.err
    assert (tmp_path / "out" / "keep.txt").read_bytes() == b"keep"
    assert (tmp_path / "out" / "change.txt").read_bytes() == b"new " * 50
    assert (tmp_path / "out" / "more" / "new.txt").read_bytes() == b"+"
    assert sorted(snapshot(tmp_path / "out")) == ["change.txt", "keep.txt", "more",
                                                  "more/new.txt"]


@pytest.mark.parametrize(("before", "after"), [
    pytest.param({"d/f": b"in folder", "g": b"g"}, {"d": b"now a file"}, id="file-over-folder"),
    pytest.param({"d/f": b"in folder", "g": b"g"}, {"g/inner": b"now a folder"},
                 id="folder-over-file"),
])
def test_add_never_makes_a_volume_that_cannot_be_extracted(
        tmp_path: Path, cli: Callable[..., CliResult], before: dict[str, bytes],
        after: dict[str, bytes]) -> None:
    """``add`` of a file where the volume has a folder (or the reverse) must either be refused,
    leaving the volume as it was, or give a volume that verifies *and* extracts."""
    first = write_tree(tmp_path / "one", before)
    second = write_tree(tmp_path / "two", after)
    key = VolumeKey.generate()
    old_tag = Volume.create(tmp_path / "vol", key, source=first, chunk_size=C).tag
    added = cli("volume", "add", tmp_path / "vol", second, "--key", key.hex(),
                "--tag", old_tag.hex(), "--envar-output")
    if added.code != 0:
        assert added.err.startswith("tdapp: error: ")
        assert Volume.open(tmp_path / "vol", key, old_tag).verify().files == 2
        return
    new_tag = added.out.splitlines()[1].removeprefix("export VOLUME_TAG=")
    verified = cli("volume", "verify", tmp_path / "vol", "--key", key.hex(), "--tag", new_tag)
    extracted = cli("volume", "extract", tmp_path / "vol", tmp_path / "out",
                    "--key", key.hex(), "--tag", new_tag)
    assert (verified.code, extracted.code) == (0, 0), (verified.out, extracted.err)
    for path, content in after.items():
        assert (tmp_path / "out" / path).read_bytes() == content


@pytest.fixture
def small_volume(tmp_path: Path) -> tuple[Volume, Path]:
    source = write_tree(tmp_path / "src", {"docs/a.txt": b"A" * 100, "b.txt": b"B"})
    return Volume.create(tmp_path / "vol", VolumeKey.generate(), source=source,
                         chunk_size=C), source


@pytest.mark.parametrize("obstacle", ["file-where-folder", "folder-where-file",
                                      "symlink-where-folder"])
def test_extract_refuses_conflicts_without_writing(tmp_path: Path, obstacle: str,
                                                   small_volume: tuple[Volume, Path]) -> None:
    volume, _ = small_volume
    out = tmp_path / "out"
    elsewhere = write_tree(tmp_path / "elsewhere", {"x": b"x"})
    write_tree(out, {"keep": b"keep"})
    if obstacle == "file-where-folder":
        (out / "docs").write_bytes(b"in the way")
    elif obstacle == "folder-where-file":
        (out / "b.txt").mkdir()
    else:
        (out / "docs").symlink_to(elsewhere)
    before = snapshot(out)
    with pytest.raises(InputError, match="in the way of a"):
        volume.extract(out)
    assert snapshot(out) == before
    assert snapshot(elsewhere) == {"x": ("file", 0o644, b"x")}


def test_extract_replaces_symlink_instead_of_following_it(
        tmp_path: Path, small_volume: tuple[Volume, Path]) -> None:
    volume, source = small_volume
    victim = tmp_path / "victim"
    victim.write_bytes(b"untouched")
    out = tmp_path / "out"
    out.mkdir()
    (out / "b.txt").symlink_to(victim)
    volume.extract(out)
    assert victim.read_bytes() == b"untouched"
    assert not (out / "b.txt").is_symlink()
    assert snapshot(out) == snapshot(source)

"""Nothing of an encrypted file, its name, or a key can be read from a stored volume."""

from __future__ import annotations

import os
from pathlib import Path

from conftest import Made, MakeVolume, write_tree

from tdapp.volume import RegionKind, Volume
from tdapp.volume.fspf import open_fspf

C = 64
ASCII_MARKER = "ZQXJ-ascii-marker-7731"
UTF8_MARKER = "Ünïcødé-标记-🔐-märker"
DIR_MARKER = "folder-QWKZ-dir-marker"
BOUNDARY_MARKER = b"<<chunk-boundary-marker-5521>>"

# The boundary marker straddles the end of chunk 0 and the start of chunk 1.
_BIG = bytearray(os.urandom(4 * C))
_BIG[C - 15: C - 15 + len(BOUNDARY_MARKER)] = BOUNDARY_MARKER

FILES: dict[str, bytes | None] = {
    f"{ASCII_MARKER}.txt": f"content with {ASCII_MARKER} inside, long enough".encode(),
    f"{UTF8_MARKER}.txt": f"inhalt {UTF8_MARKER} — länger als ein Block".encode(),
    f"{DIR_MARKER}/{UTF8_MARKER}-nested": b"nested file content: " + UTF8_MARKER.encode(),
    f"{DIR_MARKER}/empty-{ASCII_MARKER}": b"",
    f"{DIR_MARKER}/empty-folder-{UTF8_MARKER}": None,
    "multi/chunk.bin": bytes(_BIG),
    "repetitive.txt": (ASCII_MARKER * 20).encode(),
}
MARKERS = [ASCII_MARKER, UTF8_MARKER, DIR_MARKER, f"{ASCII_MARKER}.txt", "multi/chunk.bin",
           "repetitive", "chunk_size", '"files"', "mtime_ns"]


def stored_bytes(root: Path) -> dict[str, bytes]:
    """Every stored file of a volume folder (recursively), and every entry's name."""
    found: dict[str, bytes] = {}
    for current, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(current) / name
            found[f"name:{path.relative_to(root)}"] = name.encode()
            if path.is_file():
                found[str(path.relative_to(root))] = path.read_bytes()
    return found


def secrets_of(made: Made) -> dict[str, bytes]:
    """What must never appear in clear: markers, contents, chunks, the volume and file keys."""
    needles = {f"marker {marker!r}": marker.encode() for marker in MARKERS}
    needles["boundary marker"] = BOUNDARY_MARKER
    needles["volume key (raw)"] = made.key.raw
    needles["volume key (hex)"] = made.key.hex().encode()
    needles["volume key (HEX)"] = made.key.hex().upper().encode()
    for path, content in FILES.items():
        if content:
            needles[f"content of {path}"] = content
            for start in range(0, len(content) - 15, 16):
                needles[f"bytes {start}..{start + 16} of {path}"] = content[start:start + 16]
    manifest = open_fspf((made.root / "volume.fspf").read_bytes(), made.key, made.tag)
    for path, entry in manifest.files.items():
        needles[f"file key of {path} (raw)"] = entry.file_key
        needles[f"file key of {path} (hex)"] = entry.file_key.hex().encode()
    return needles


def test_nothing_readable_in_stored_volume(make_volume: MakeVolume) -> None:
    made = make_volume(FILES, chunk_size=C)
    stored = stored_bytes(made.root)
    assert len([name for name in stored if not name.startswith("name:")]) == 1 + 6
    needles = secrets_of(made)
    assert len(needles) > 40
    leaks = [(what, where) for what, needle in needles.items()
             for where, haystack in stored.items() if needle in haystack]
    assert leaks == []


def test_search_finds_a_planted_leak(make_volume: MakeVolume) -> None:
    """The search above works: a marker planted in a not-protected file is found."""
    made = make_volume({**FILES, "public/leak.txt": UTF8_MARKER.encode()}, chunk_size=C,
                       regions={"public": RegionKind.NOT_PROTECTED})
    stored = stored_bytes(made.root)
    hits = [where for where, haystack in stored.items() if UTF8_MARKER.encode() in haystack]
    assert hits == [os.path.join("plain", "public", "leak.txt")]


def test_same_tree_gives_unrelated_volumes(make_volume: MakeVolume) -> None:
    one = make_volume(FILES, chunk_size=C)
    two = make_volume(FILES, chunk_size=C)
    assert one.key != two.key
    objects_one = {p.name: p.read_bytes() for p in (one.root / "objects").iterdir()}
    objects_two = {p.name: p.read_bytes() for p in (two.root / "objects").iterdir()}
    assert len(objects_one) == len(objects_two) == 6
    assert set(objects_one).isdisjoint(objects_two)
    assert set(objects_one.values()).isdisjoint(objects_two.values())
    # not even one 16-byte block is shared between the two volumes
    blocks_one = {blob[i:i + 16] for blob in objects_one.values() for i in range(0, len(blob), 16)}
    blocks_two = {blob[i:i + 16] for blob in objects_two.values() for i in range(0, len(blob), 16)}
    assert blocks_one.isdisjoint(blocks_two)
    fspf_one = (one.root / "volume.fspf").read_bytes()
    fspf_two = (two.root / "volume.fspf").read_bytes()
    assert fspf_one[12:60] != fspf_two[12:60]  # key check and salt
    assert fspf_one[60:] != fspf_two[60:]


def test_rewriting_a_file_renews_its_key_and_name(make_volume: MakeVolume,
                                                  tmp_path: Path) -> None:
    made = make_volume({"seed.txt": b"x"}, chunk_size=C)
    update = write_tree(tmp_path / "update", {"same.bin": bytes(_BIG)})
    volume = Volume.open(made.root, made.key, made.tag)
    versions: list[tuple[str, bytes, bytes]] = []
    for _ in range(3):
        tag = volume.add(update)
        entry = open_fspf((made.root / "volume.fspf").read_bytes(), made.key, tag) \
            .files["same.bin"]
        stored = (made.root / "objects" / entry.object_name).read_bytes()
        versions.append((entry.object_name, entry.file_key, stored))
        # the replaced version is gone: objects are seed.txt and the current same.bin
        assert len(os.listdir(made.root / "objects")) == 2
    names, keys, blobs = zip(*versions, strict=True)
    assert len(set(names)) == 3
    assert len(set(keys)) == 3
    assert len(set(blobs)) == 3
    assert b"".join(volume.read("same.bin")) == bytes(_BIG)


def test_salt_and_tag_change_on_every_write(make_volume: MakeVolume, tmp_path: Path) -> None:
    made = make_volume({"a": b"a"}, chunk_size=C)
    empty = write_tree(tmp_path / "empty", {})
    volume = Volume.open(made.root, made.key, made.tag)
    headers = {(made.root / "volume.fspf").read_bytes()[28:60]}
    tags = {made.tag}
    for _ in range(3):
        tags.add(volume.add(empty))  # same manifest content except the generation
        headers.add((made.root / "volume.fspf").read_bytes()[28:60])
    assert len(tags) == 4
    assert len(headers) == 4

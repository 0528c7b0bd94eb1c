"""The live volume under random workloads: content as a model file says, no nonce reused.

A hypothesis state machine drives writes, truncations and re-opens on one file
of a :class:`LiveVolume` next to a plain bytearray model. Every chunk sealed is
recorded by its (object id, index): under one key an index is sealed at most once.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tdapp.volume import Volume, VolumeKey
from tdapp.volume.chunks import FileSealer

CHUNK = 4096  # the smallest chunk size: many chunks with little data

operation = st.one_of(
    st.tuples(st.just("write"), st.integers(0, 6 * CHUNK),
              st.binary(min_size=1, max_size=2 * CHUNK + 7)),
    # chunk-aligned writes of whole chunks: sealed straight from the request
    st.tuples(st.just("write"), st.integers(0, 6).map(lambda index: index * CHUNK),
              st.binary(min_size=CHUNK, max_size=3 * CHUNK + 1)),
    st.tuples(st.just("truncate"), st.integers(0, 7 * CHUNK), st.just(b"")),
    st.tuples(st.just("release"), st.just(0), st.just(b"")),
)


@pytest.fixture
def sealed_indices(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[bytes, int]]]:
    seen: list[tuple[bytes, int]] = []
    original = FileSealer.seal

    def recording(self: FileSealer, index: int, payload: Any, *, last: bool | None = None) -> bytes:
        seen.append((self._object_id, index))
        return original(self, index, payload, last=last)

    monkeypatch.setattr(FileSealer, "seal", recording)
    yield seen


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(start=st.binary(max_size=3 * CHUNK), operations=st.lists(operation, max_size=25))
def test_random_workloads(tmp_path_factory: pytest.TempPathFactory,
                          sealed_indices: list[tuple[bytes, int]], start: bytes,
                          operations: list[tuple[str, int, bytes]]) -> None:
    root = tmp_path_factory.mktemp("live")
    (root / "src").mkdir()
    (root / "src" / "f").write_bytes(start)
    key = VolumeKey.generate()
    volume = Volume.create(root / "vol", key, source=root / "src", chunk_size=CHUNK)
    sealed_indices.clear()
    model = bytearray(start)
    with volume.live() as live:
        for kind, number, data in operations:
            if kind == "write":
                if number > len(model):
                    model.extend(bytes(number - len(model)))
                model[number:number + len(data)] = data
                live.write("/f", number, data)
            elif kind == "truncate":
                del model[number:]
                model.extend(bytes(number - len(model)))
                live.truncate("/f", number)
            else:
                live.release("/f")
            assert live.read("/f", 0, len(model) + 10) == bytes(model)
        tag = live.commit()
    assert len(sealed_indices) == len(set(sealed_indices)), "a chunk index was sealed twice"
    reopened = Volume.open(root / "vol", key, tag)
    reopened.verify()
    assert b"".join(reopened.read("f")) == bytes(model)
    referenced = {info.path for info in reopened.files()}
    assert referenced == {"f"}
    assert len(list((root / "vol" / "objects").iterdir())) == 1  # superseded objects removed


def test_a_tree_of_changes_commits_once(tmp_path: Path) -> None:
    key = VolumeKey.generate()
    volume = Volume.create(tmp_path / "vol", key)
    with volume.live() as live:
        live.mkdir("/a", 0o750)
        live.create("/a/x", 0o600)
        live.write("/a/x", 0, b"x" * 10000)
        live.rename("/a", "/b")
        assert live.listdir("/") == ["b"] and live.listdir("/b") == ["x"]
        assert live.stat("/b")[0] is True and live.stat("/b/x")[1:3] == (10000, 0o600)
        live.unlink("/b/x")
        assert live.listdir("/b") == []  # the folder stays
        with pytest.raises(OSError, match="No such file"):
            live.read("/b/x", 0, 1)
        live.create("/b/y", 0o644)
        tag = live.commit()
    reopened = Volume.open(tmp_path / "vol", key, tag)
    assert [info.path for info in reopened.files()] == ["b/y"]

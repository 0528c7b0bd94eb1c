"""The shared primitives: atomic writes (replace and create-only), canonical JSON, addresses."""

from __future__ import annotations

import multiprocessing
import os
import stat
from pathlib import Path

import pytest

from tdapp.core.address import Address
from tdapp.core.atomic import TEMP_SUFFIX, WriteMode, atomic_file, write_atomically
from tdapp.core.canonical import canonical_json
from tdapp.errors import UsageError


def _leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.endswith(TEMP_SUFFIX)]


def test_replace_writes_the_whole_file_with_its_mode(tmp_path: Path) -> None:
    target = tmp_path / "secret"
    target.write_bytes(b"old")
    write_atomically(target, b"new", permissions=0o600)
    assert target.read_bytes() == b"new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert _leftovers(tmp_path) == []


def test_create_only_never_replaces(tmp_path: Path) -> None:
    target = tmp_path / "key"
    write_atomically(target, b"first", mode=WriteMode.CREATE_ONLY)
    with pytest.raises(FileExistsError):
        write_atomically(target, b"second", mode=WriteMode.CREATE_ONLY)
    assert target.read_bytes() == b"first"
    assert _leftovers(tmp_path) == []


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    target.write_bytes(b"kept")
    with pytest.raises(RuntimeError), atomic_file(target) as handle:
        handle.write(b"half")
        raise RuntimeError("crash in the middle")
    assert target.read_bytes() == b"kept"
    assert _leftovers(tmp_path) == []


def test_a_secret_is_never_readable_by_others_while_written(tmp_path: Path) -> None:
    target = tmp_path / "secret"
    old_umask = os.umask(0)
    try:
        with atomic_file(target, permissions=0o600) as handle:
            (partial,) = [p for p in tmp_path.iterdir() if p.name.endswith(TEMP_SUFFIX)]
            assert stat.S_IMODE(partial.stat().st_mode) == 0o600
            handle.write(b"k")
    finally:
        os.umask(old_umask)


def _make_master_key(path: str, start: multiprocessing.synchronize.Event,
                     results: multiprocessing.Queue[str]) -> None:
    from tdapp.cas.sealing import MasterKey

    start.wait()
    key = MasterKey.load_or_create(Path(path))
    results.put(key.subkey(b"test").hex())


def test_two_cas_starting_at_once_share_one_master_key(tmp_path: Path) -> None:
    """Attack: race two CAS processes on a new state folder. Before create-only
    writes, each could replace the other's key, so one's sealed rows became
    unreadable to the other; now both end with the same key."""
    for attempt in range(5):
        path = tmp_path / f"master-{attempt}.key"
        context = multiprocessing.get_context("fork")
        start = context.Event()
        results: multiprocessing.Queue[str] = context.Queue()
        workers = [context.Process(target=_make_master_key, args=(str(path), start, results))
                   for _ in range(6)]
        for worker in workers:
            worker.start()
        start.set()
        keys = {results.get(timeout=60) for _ in workers}
        for worker in workers:
            worker.join(timeout=60)
        assert len(keys) == 1, f"attempt {attempt}: {len(keys)} different master keys"
        assert _leftovers(tmp_path) == []


def test_canonical_json_is_one_form() -> None:
    assert canonical_json({"b": 1, "a": "é"}) == '{"a":"é","b":1}'.encode()
    with pytest.raises(ValueError):
        canonical_json({"x": float("nan")})


@pytest.mark.parametrize(("text", "expected"), [
    ("127.0.0.1:8081", Address("127.0.0.1", 8081)),
    ("https://cas.example:443/", Address("cas.example", 443)),
    ("[::1]:9", Address("::1", 9)),
    ("host", Address("host", 8081)),
])
def test_addresses_parse(text: str, expected: Address) -> None:
    assert Address.parse(text) == expected


@pytest.mark.parametrize("text", [":80", "h:x", "h:0", "h:70000"])
def test_bad_addresses_are_usage_errors(text: str) -> None:
    with pytest.raises(UsageError):
        Address.parse(text)

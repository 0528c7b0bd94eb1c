"""Shared helpers for the volume tests: source trees, volumes, CLI runs, folder snapshots."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

import tdapp.cli
from tdapp.volume import RegionKind, RegionMap, Volume, VolumeKey, VolumeTag
from tdapp.volume.fspf import FileEntry, open_fspf


@dataclass(frozen=True)
class Made:
    """A volume made by the ``make_volume`` fixture."""

    root: Path
    key: VolumeKey
    tag: VolumeTag
    source: Path

    def entry(self, path: str, tag: VolumeTag | None = None) -> FileEntry:
        """The FSPF record of one protected file (to find its stored object)."""
        data = (self.root / "volume.fspf").read_bytes()
        return open_fspf(data, self.key, tag or self.tag).files[path]

    def object_path(self, path: str) -> Path:
        return self.root / "objects" / self.entry(path).object_name

    def key_args(self) -> list[str]:
        return ["--key", self.key.hex(), "--tag", self.tag.hex()]


@dataclass(frozen=True)
class CliResult:
    code: int
    out: str
    err: str


def write_tree(root: Path, files: Mapping[str, bytes | None]) -> Path:
    """Write ``{relative path: content}`` under ``root``; ``None`` makes an empty folder."""
    root.mkdir(parents=True, exist_ok=True)
    for relative, content in files.items():
        target = root / relative
        if content is None:
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content)
    return root


def snapshot(root: Path) -> dict[str, tuple[object, ...]]:
    """Every entry under ``root`` (root excluded): kind, mode, and content for files."""
    result: dict[str, tuple[object, ...]] = {}
    for current, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            absolute = Path(current) / name
            info = absolute.lstat()
            relative = absolute.relative_to(root).as_posix()
            if stat.S_ISDIR(info.st_mode):
                result[relative] = ("dir", stat.S_IMODE(info.st_mode))
            elif stat.S_ISREG(info.st_mode):
                result[relative] = ("file", stat.S_IMODE(info.st_mode), absolute.read_bytes())
            else:
                result[relative] = ("other", info.st_mode)
    return result


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch,
                       tmp_path_factory: pytest.TempPathFactory) -> None:
    # A home of its own for whatever a test does in-process without choosing one, so no
    # test reads or writes the real ~/.tdapp (tests that need a home set their own).
    monkeypatch.setenv("TDAPP_HOME", str(tmp_path_factory.mktemp("home")))
    # setenv then delenv: the variable is absent during the test, and whatever the
    # test (or ``tdapp --debug``, which sets TDAPP_DEBUG) leaves is undone afterwards.
    for name in ("VOLUME_KEY", "VOLUME_TAG", "TDAPP_DEBUG"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)


MakeVolume = Callable[..., Made]


@pytest.fixture
def make_volume(tmp_path: Path) -> MakeVolume:
    """Create a volume through the API from ``{path: content}``; returns a :class:`Made`."""
    counter = 0

    def make(files: Mapping[str, bytes | None], *, chunk_size: int = 64,
             regions: Mapping[str, RegionKind] | None = None) -> Made:
        nonlocal counter
        counter += 1
        source = write_tree(tmp_path / f"src{counter}", files)
        root = tmp_path / f"vol{counter}"
        key = VolumeKey.generate()
        region_map = RegionMap.build((regions or {}).items())
        volume = Volume.create(root, key, source=source, regions=region_map,
                               chunk_size=chunk_size)
        return Made(root, key, volume.tag, source)

    return make


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., CliResult]:
    """Run ``tdapp.cli.run`` in-process and capture its exit code, stdout and stderr."""

    def run(*args: str | Path) -> CliResult:
        capsys.readouterr()
        code = tdapp.cli.run([str(arg) for arg in args])
        captured = capsys.readouterr()
        return CliResult(int(code), captured.out, captured.err)

    return run


def run_tdapp(*args: str | Path, env: Mapping[str, str] | None = None) -> CliResult:
    """Run the real ``tdapp`` program (``python -m tdapp``) in a child process."""
    environment = {key: value for key, value in os.environ.items()
                   if key not in ("VOLUME_KEY", "VOLUME_TAG", "TDAPP_DEBUG")}
    environment.update(env or {})
    done = subprocess.run([sys.executable, "-m", "tdapp", *map(str, args)],
                          capture_output=True, text=True, env=environment, timeout=120,
                          check=False)
    return CliResult(done.returncode, done.stdout, done.stderr)


def assert_error(result: CliResult, code: int, fragment: str) -> None:
    """The CLI error convention: one ``tdapp: error:`` line, the exit code, no traceback."""
    assert result.code == code, (result.code, result.err)
    lines = result.err.splitlines()
    assert len(lines) == 1, result.err
    assert lines[0].startswith("tdapp: error: "), result.err
    assert fragment in lines[0], result.err
    assert "Traceback" not in result.err


# -- CAS integration fixtures: real servers, users, PostgreSQL (see cas_fixtures.py) -------
from cas_fixtures import cas_server, postgres, user  # noqa: E402, F401

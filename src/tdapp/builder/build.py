"""``tdapp build``: from an app folder to a measured image in the store.

Owns the order of a build: check every option, build a private copy of the
folder (tdapp.builder.compile), choose the image's files
(tdapp.builder.content), stage them with normalized modes, measure what was
staged, and publish it whole (tdapp.builder.store). Must never publish an image
whose manifest was not computed from the very files staged with it.
"""

from __future__ import annotations

import fnmatch
import os
import posixpath
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from tdapp.builder.compile import Output, copy_sources, run_build
from tdapp.builder.content import select_files
from tdapp.builder.manifest import (
    DEFAULT_HEAP,
    DEFAULT_STACK,
    HEAP_RANGE,
    STACK_RANGE,
    Config,
    FileRecord,
    Manifest,
    check_host_paths,
    check_limit,
    check_mode,
    check_name,
    parse_entrypoint,
)
from tdapp.builder.measure import measurement, scan_tree
from tdapp.builder.store import Image, Staging, normalized_mode
from tdapp.errors import InputError, UsageError


@dataclass(frozen=True)
class BuildOptions:
    name: str
    entrypoint: str | None = None
    """A command line (split like a session's ``command``); default: the one executable."""
    heap: int = DEFAULT_HEAP
    stack: int = DEFAULT_STACK
    mode: str = "sim"
    host_paths: tuple[str, ...] = ()


def _ignore(_: str) -> None:
    return None


def build_image(app_dir: Path, options: BuildOptions, output: Output = _ignore) -> Image:
    """Build ``app_dir`` and store it as image ``options.name``; ``output`` gets build lines."""
    # Every option is checked before anything is compiled.
    name = check_name(options.name)
    heap = check_limit(options.heap, "heap", HEAP_RANGE)
    stack = check_limit(options.stack, "stack", STACK_RANGE)
    mode = check_mode(options.mode)
    host_paths = check_host_paths(options.host_paths)
    command = parse_entrypoint(options.entrypoint) if options.entrypoint is not None else None
    if not app_dir.is_dir():
        raise InputError(f"{app_dir} is not a folder")
    with tempfile.TemporaryDirectory(prefix="tdapp-build-", ignore_cleanup_errors=True) as work:
        build_dir = Path(work) / "app"
        copy_sources(app_dir, build_dir)
        run_build(app_dir, build_dir, output)
        selection = select_files(build_dir, app_dir)
        with Staging() as staging:
            for relative, source in sorted(selection.items()):
                mode_bits = os.stat(source, follow_symlinks=False).st_mode
                staging.copy_file(relative, source, normalized_mode(mode_bits))
            # Measure what was staged, not what was selected: the stored bytes count.
            tree = scan_tree(staging.root)
            entrypoint = choose_entrypoint(command, tree.files, host_paths)
            config = Config(entrypoint, heap, stack, mode, host_paths)
            manifest = Manifest(name, config, tree.files, measurement(config, tree), now(),
                                tree.dirs, tree.links)
            staging.write_manifest(manifest)
            path = staging.publish(name)
    return Image.from_manifest(manifest, path)


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def choose_entrypoint(command: tuple[str, ...] | None, files: Iterable[FileRecord],
                      host_paths: tuple[str, ...]) -> tuple[str, ...]:
    """The given command, checked against the image; or the image's single executable."""
    by_path = {record.path: record for record in files}
    if command is None:
        executables = sorted(path for path, record in by_path.items() if record.mode & 0o111)
        if len(executables) == 1:
            return ("/" + executables[0],)
        if not executables:
            raise UsageError("the image has no executable file; name the program with "
                             "--entrypoint")
        shown = ", ".join("/" + path for path in executables[:5])
        more = ", …" if len(executables) > 5 else ""
        raise UsageError(f"the image has {len(executables)} executable files ({shown}{more}); "
                         "choose one with --entrypoint")
    program = command[0]
    record = by_path.get(posixpath.normpath(program).lstrip("/"))
    if record is not None:
        if not record.mode & 0o111:
            raise UsageError(f"entrypoint {program} is not executable in the image "
                             f"(mode {record.mode:04o})")
    elif not any(_covers(pattern, program) for pattern in host_paths):
        raise UsageError(f"entrypoint {program} is neither a file of the image nor under a "
                         "--host-path")
    return command


def _covers(pattern: str, path: str) -> bool:
    """Whether host path ``pattern`` (maybe a glob) is ``path`` or one of its parents."""
    current = posixpath.normpath(path)
    while current != "/":
        if fnmatch.fnmatchcase(current, pattern):
            return True
        current = posixpath.dirname(current)
    return False

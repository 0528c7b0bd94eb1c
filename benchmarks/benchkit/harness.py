"""The measuring loop: per file system and workload, each tool writes then reads, in turns.

Every step starts settled (synced; on a disk its input dropped from the page cache), runs
under a deadline, and has its output disposed of, untimed, before the next one. The first
run of each tool is checked against the source. One broken tool does not stop the others.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tdapp.volume.layout import sync_file_system

from .filesystems import FileSystem, mounts_under, settle
from .peers import Tool
from .processes import deadline, log, unmount
from .report import Result, Results, record
from .trees import Workload, check_same_tree, make_source, remove_tree

DEFER_DELETE_FILES = 100  # trees with more files are deleted after the workload


@dataclass(frozen=True)
class Stage:
    """Where one workload is measured on one file system."""

    fs: FileSystem
    work: Path
    source: Path
    workload: Workload
    timeout_s: float
    trash: Path | None  # many-file outputs wait here until the workload is done

    def dispose(self, path: Path) -> None:
        """Delete a step's output now, or (many small files) move it to the trash.

        ext4 without a journal (this VM's disk) does not reuse an inode deleted in the
        last 5-10 s and re-checks every such inode on each create, so deleting 10,000
        files just before the next step creates 10,000 makes that step several times
        slower. Renaming the tree away and deleting it after the workload avoids that.
        """
        for point in mounts_under(path):
            unmount(Path(point))
        if not path.exists():
            return
        if self.trash is None or mounts_under(path):
            remove_tree(path)
            return
        self.trash.mkdir(exist_ok=True)
        path.rename(self.trash / f"{len(os.listdir(self.trash))}-{path.name}")


def measure_tool_once(tool: Tool, stage: Stage, pair: tuple[Result, Result],
                      check: bool) -> None:
    """One write then one read by ``tool``; outputs disposed of afterwards."""
    written, read = pair
    stored, output = stage.work / f"stored-{tool.name}", stage.work / f"out-{tool.name}"
    try:
        settle(stage.fs, stage.work, stage.source)
        with deadline(stage.timeout_s, f"{tool.name} {written.direction}"):
            written.runs.append(tool.write(stage.source, stored, stage.workload))
        settle(stage.fs, stage.work, stored)
        with deadline(stage.timeout_s, f"{tool.name} {read.direction}"):
            read.runs.append(tool.read(stored, output, stage.workload))
        if check:
            check_same_tree(stage.source, output)
    finally:
        stage.dispose(output)
        stage.dispose(stored)
        sync_file_system(stage.work)
    log(f"  {stage.fs.key}/{stage.workload.name} {tool.name:9s} {written.direction} "
        f"{written.runs[-1]:7.3f} s, {read.direction} {read.runs[-1]:7.3f} s")


def _new_result(results: Results, fs: FileSystem, workload: Workload, tool: Tool,
                direction: str) -> Result:
    return record(results, Result(fs.key, workload.name, tool.name, direction,
                                  workload.total_bytes, workload.files, workload.label,
                                  tool.note(workload), facts=tool.facts(workload)))


def measure_workload(fs: FileSystem, work: Path, workload: Workload, tools: list[Tool],
                     results: Results, repeats: int, timeout_s: float) -> None:
    """Make the source tree, then ``repeats`` rounds of every available tool in turn."""
    pairs = {}
    for tool in tools:
        write_verb, read_verb = tool.verbs
        pair = (_new_result(results, fs, workload, tool, write_verb),
                _new_result(results, fs, workload, tool, read_verb))
        reason = tool.missing()
        if reason:
            for result in pair:
                result.status = reason
        else:
            pairs[tool.name] = pair
    many_files = workload.files > DEFER_DELETE_FILES
    stage = Stage(fs, work, work / f"source-{workload.name}", workload, timeout_s,
                  work / f"trash-{workload.name}" if many_files else None)
    log(f"{fs.key}: making {workload.label} source tree in {work}")
    make_source(stage.source, workload)
    try:
        for repeat in range(repeats):
            for tool in tools:
                if tool.name in pairs:
                    _measure_or_fail(tool, stage, pairs, repeat)
    finally:
        remove_tree(stage.source)
        if stage.trash is not None:
            log(f"{fs.key}: deleting the outputs of the {workload.name} workload")
            remove_tree(stage.trash)
        sync_file_system(work)


def _measure_or_fail(tool: Tool, stage: Stage, pairs: dict[str, tuple[Result, Result]],
                     repeat: int) -> None:
    pair = pairs[tool.name]
    try:
        measure_tool_once(tool, stage, pair, check=repeat == 0)
    except Exception as error:  # one broken tool must not stop the others
        log(f"  {stage.fs.key}/{stage.workload.name} {tool.name} FAILED: {error}")
        for result in pair:
            result.status = f"failed: {error}"[:120]
        del pairs[tool.name]


def measure_file_system(fs: FileSystem, workloads: list[Workload], tools: list[Tool],
                        results: Results, repeats: int, timeout_s: float,
                        work_prefix: str) -> None:
    """Every workload in a fresh folder ``<work_prefix>…`` on ``fs``, deleted afterwards."""
    work = Path(tempfile.mkdtemp(prefix=work_prefix, dir=fs.base))
    log(f"{fs.key}: working in {work} ({fs.fstype} on {fs.device}, mounted at {fs.mount_point})")
    try:
        for workload in workloads:
            measure_workload(fs, work, workload, tools, results, repeats, timeout_s)
    finally:
        remove_tree(work)

"""Results and what is made of them: ratios, targets, the rich table, the last-line JSON.

A report compares one tool, the subject, with the others on the same file system and
workload; ``Layout`` names the subject, the reference (the I/O ceiling) and the order of
rows. Targets are ``Check``s: a benchmark builds its own list, and the text lines and the
JSON verdicts both come from it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.table import Table

from .filesystems import FileSystem
from .units import MB

KINDS = ("write", "read")


@dataclass
class Result:
    fs: str
    workload: str
    tool: str
    direction: str
    bytes: int
    files: int
    workload_label: str
    note: str = ""
    status: str = "ok"
    runs: list[float] = field(default_factory=list)
    facts: dict[str, str] = field(default_factory=dict)  # extra JSON entries of the workload

    @property
    def best(self) -> float | None:
        return min(self.runs) if self.runs and self.status == "ok" else None

    @property
    def mbps(self) -> float | None:
        best = self.best
        return self.bytes / best / MB if best else None

    @property
    def files_per_s(self) -> float | None:
        best = self.best
        return self.files / best if best else None

    @property
    def kind(self) -> str:
        return "write" if self.direction in ("write", "encrypt") else "read"


Results = dict[tuple[str, str, str, str], Result]


def record(results: Results, result: Result) -> Result:
    results[(result.fs, result.workload, result.tool, result.direction)] = result
    return result


@dataclass(frozen=True)
class Layout:
    """What a report compares and in which order it lists it."""

    subject: str  # the tool under test: the "<subject> x" column and the ratios
    reference: str  # the I/O ceiling: the "x <reference>" column
    tools: tuple[str, ...]  # row order within a file system, workload and side
    workloads: tuple[str, ...]
    file_systems: tuple[str, ...]  # row order; keys that are no FileSystem print as they are
    json_names: Mapping[str, str] = field(default_factory=dict)  # tool -> name in JSON keys
    count_name: str = "files"  # what a result's count counts: "<count_name>/s" column, JSON


def find(results: Results, fs: str, workload: str, tool: str, kind: str) -> Result | None:
    for result in results.values():
        if (result.fs, result.workload, result.tool, result.kind) == (fs, workload, tool, kind):
            return result
    return None


def ratio(numerator: Result | None, denominator: Result | None) -> float | None:
    if numerator is None or denominator is None:
        return None
    top, bottom = numerator.mbps, denominator.mbps
    return top / bottom if top and bottom else None


def rounded(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(value, digits)


def _pair(results: Results, layout: Layout, fs: str, workload: str, kind: str,
          baseline: str) -> tuple[Result, Result] | None:
    """The subject's and ``baseline``'s results on one side, if both exist."""
    subject = find(results, fs, workload, layout.subject, kind)
    other = find(results, fs, workload, baseline, kind)
    return (subject, other) if subject and other else None


def compute_ratios(results: Results, layout: Layout, measured: list[str]) -> dict[str, Any]:
    """fs -> workload -> "<subject>_<dir>_vs_<tool>_<dir>": subject MB/s / tool MB/s."""
    ratios: dict[str, Any] = {}
    for fs in measured:
        for workload in layout.workloads:
            entry = ratios.setdefault(fs, {}).setdefault(workload, {})
            for kind in KINDS:
                for other in layout.tools:
                    pair = _pair(results, layout, fs, workload, kind, other)
                    if pair and other != layout.subject:
                        subject, baseline = pair
                        mine, theirs = subject.direction, baseline.direction
                        entry[f"{layout.subject}_{mine}_vs_{other}_{theirs}"] = rounded(
                            ratio(subject, baseline), 3)
    return ratios


# -- targets ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    """One target: ``value`` must reach ``minimum``; ``key`` names it in the JSON."""

    key: str
    label: str
    value: float | None
    minimum: float
    unit: str  # "x" for ratios

    @property
    def met(self) -> bool | None:
        return None if self.value is None else self.value >= self.minimum

    def line(self) -> str:
        label, target, unit = self.label, self.minimum, self.unit
        if self.value is None:
            return f"  {label:48s} {'—':>9s}   (target >= {target:,.2f}{unit})  not measured"
        verdict = "met" if self.met else "NOT MET"
        digits = 0 if target >= 100 else 2
        return (f"  {label:48s} {self.value:>9,.{digits}f}{unit}"
                f"  (target >= {target:,.{digits}f}{unit})  {verdict}")


def ratio_checks(results: Results, layout: Layout, fs: str, workloads: Iterable[str],
                 baseline: str, minimum: float, suffix: str) -> list[Check]:
    """Subject MB/s >= ``minimum`` x ``baseline`` MB/s, each workload and side run by both."""
    checks = []
    for workload in workloads:
        for kind in KINDS:
            pair = _pair(results, layout, fs, workload, kind, baseline)
            if pair:
                subject, other = pair
                mine, theirs = subject.direction, other.direction
                checks.append(Check(
                    f"{fs}_{workload}_{layout.subject}_{mine}_vs_{baseline}_{theirs}_{suffix}",
                    f"{fs}/{workload}: {layout.subject} {mine} / {baseline} {theirs}",
                    ratio(subject, other), minimum, "x"))
    return checks


def rate_checks(results: Results, layout: Layout, fs: str, workload: str, minimum: float,
                suffix: str) -> list[Check]:
    """Subject files/s >= ``minimum`` on each side it was run."""
    checks = []
    for kind in KINDS:
        subject = find(results, fs, workload, layout.subject, kind)
        if subject:
            mine = subject.direction
            checks.append(Check(
                f"{fs}_{workload}_{layout.subject}_{mine}_files_per_s_{suffix}",
                f"{fs}/{workload}: {layout.subject} {mine} files/s",
                subject.files_per_s, minimum, ""))
    return checks


def all_met(checks: list[Check]) -> bool | None:
    values = [check.met for check in checks]
    if False in values:
        return False
    if None in values or not values:
        return None
    return True


# -- table and JSON ------------------------------------------------------------------------


def _format_number(value: float | None, digits: int = 0) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def ordered(results: Results, layout: Layout) -> list[Result]:
    """Per file system and workload: the write side, then the read side, in tool order."""
    return sorted(results.values(), key=lambda r: (
        layout.file_systems.index(r.fs), layout.workloads.index(r.workload), r.kind != "write",
        layout.tools.index(r.tool)))


def build_table(title: str, results: Results, layout: Layout,
                file_systems: dict[str, FileSystem]) -> Table:
    table = Table(title=title, show_lines=False)
    for header, justify in (("file system", "left"), ("workload", "left"), ("tool", "left"),
                            ("direction", "left"), ("best s", "right"), ("MB/s", "right"),
                            (f"{layout.count_name}/s", "right"),
                            (f"x {layout.reference}", "right"),
                            (f"{layout.subject} x", "right"), ("note", "left")):
        table.add_column(header, justify=justify)  # type: ignore[arg-type]
    rows = ordered(results, layout)
    for index, result in enumerate(rows):
        reference = find(results, result.fs, result.workload, layout.reference, result.kind)
        subject = find(results, result.fs, result.workload, layout.subject, result.kind)
        fs = file_systems.get(result.fs)
        following = rows[index + 1] if index + 1 < len(rows) else None
        table.add_row(
            fs.label if fs else result.fs,
            result.workload_label,
            result.tool,
            result.direction,
            _format_number(result.best, 3),
            _format_number(result.mbps),
            _format_number(result.files_per_s) if result.files > 1 else "",
            _format_number(ratio(result, reference), 2) if reference else "",
            _format_number(ratio(subject, result), 2)
            if subject and result.tool != layout.subject else "",
            result.note if result.status == "ok" else result.status,
            end_section=following is None
            or (following.fs, following.workload) != (result.fs, result.workload),
        )
    return table


def comparison_table(title: str, results: Results, layout: Layout, fs: str) -> Table:
    """One row per workload and direction on ``fs``: each tool's MB/s (and count/s where a
    result counts more than one), then the subject's MB/s over each other tool's."""
    others = [tool for tool in layout.tools if tool != layout.subject]
    table = Table(title=title, show_lines=False)
    table.add_column("workload")
    table.add_column("direction")
    for tool in layout.tools:
        table.add_column(f"{tool} MB/s", justify="right")
    for other in others:
        table.add_column(f"{layout.subject} / {other}", justify="right")
    rows = [result for result in ordered(results, layout)
            if result.fs == fs and result.tool == layout.subject]
    for row in rows:
        same = {tool: results.get((fs, row.workload, tool, row.direction))
                for tool in layout.tools}
        cells = [_rate_cell(same[tool], layout) for tool in layout.tools]
        cells += [_format_number(ratio(row, same[other]), 2) for other in others]
        table.add_row(row.workload_label, row.direction, *cells)
    return table


def _rate_cell(result: Result | None, layout: Layout) -> str:
    if result is None or result.mbps is None:
        return "—" if result is None or result.status == "ok" else result.status[:24]
    cell = _format_number(result.mbps)
    if result.files > 1:
        cell += f" ({_format_number(result.files_per_s)} {layout.count_name}/s)"
    return cell


def print_report(console: Console, title: str, definitions: Iterable[str], results: Results,
                 layout: Layout, file_systems: dict[str, FileSystem], skipped: dict[str, str],
                 checks: list[Check], extra_tables: Iterable[Table] = ()) -> None:
    console.print("Definitions:")
    for line in definitions:
        console.print(f"  {line}")
    console.print("File systems:")
    for fs in file_systems.values():
        console.print(f"  - {fs.key}: {fs.base} ({fs.fstype} on {fs.device}, "
                      f"mount {fs.mount_point})")
    for key, reason in skipped.items():
        console.print(f"  - {key}: SKIPPED — {reason}")
    console.print(build_table(title, results, layout, file_systems))
    for table in extra_tables:
        console.print(table)
    console.print("Targets:")
    for check in checks:
        console.print(check.line())


def figures(results: Results, layout: Layout, fs: str, workload: str) -> dict[str, Any]:
    """Every figure of one file system and workload, keyed "<tool>_<direction>_<figure>"."""
    entry: dict[str, Any] = {}
    for result in results.values():
        if (result.fs, result.workload) != (fs, workload):
            continue
        entry.setdefault("bytes", result.bytes)
        entry.setdefault(layout.count_name, result.files)
        prefix = f"{layout.json_names.get(result.tool, result.tool)}_{result.direction}"
        entry[f"{prefix}_MBps"] = rounded(result.mbps)
        if result.files > 1:
            entry[f"{prefix}_{layout.count_name}_per_s"] = rounded(result.files_per_s, 0)
        entry[f"{prefix}_s"] = rounded(result.best, 4)
        entry[f"{prefix}_runs_s"] = [round(run, 4) for run in result.runs]
        if result.status != "ok":
            entry[f"{prefix}_status"] = result.status
        entry.update(result.facts)
    return entry


def summary(head: dict[str, Any], results: Results, layout: Layout,
            file_systems: dict[str, FileSystem], skipped: dict[str, str],
            ratios: dict[str, Any], checks: list[Check], elapsed: float) -> dict[str, Any]:
    """The last-line JSON: ``head``, then per file system and workload, ratios, targets."""
    document = dict(head)
    for key in layout.file_systems:
        if key in file_systems:
            document[key] = {name: figures(results, layout, key, name)
                             for name in layout.workloads}
        elif key in skipped:
            document[key] = {"skipped": skipped[key]}
    document["ratios"] = ratios
    document["targets_met"] = {check.key: check.met for check in checks}
    document["all_targets_met"] = all_met(checks)
    document["elapsed_s"] = round(elapsed, 1)
    return document

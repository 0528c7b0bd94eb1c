"""docs/threat-model.md's tables of who can do what name tests: each must exist.

A row whose test was renamed or deleted is a promise nobody checks any more, so
every ``tests/FILE.py``, ``tests/FILE.py::test_name`` and bare ``test_name`` in
the tables' test column must be a real file or a real test function.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_REFERENCE = re.compile(r"(tests/[a-z0-9_]+\.py)?(?:::)?(test_[a-z0-9_]+)?")


def table_references() -> list[str]:
    rows = [line for line in (ROOT / "docs" / "threat-model.md").read_text().splitlines()
            if line.startswith("| ") and not line.startswith("| who ")]
    references = []
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        if len(cells) == 3:
            references += [part.strip() for part in cells[2].replace("`", "").split(",")
                           if part.strip()]
    return references


def defined_tests() -> set[str]:
    names: set[str] = set()
    for path in (ROOT / "tests").glob("test_*.py"):
        names |= set(re.findall(r"^def (test_[a-z0-9_]+)", path.read_text(), re.M))
    return names


def test_every_test_the_threat_model_names_exists() -> None:
    references = table_references()
    assert len(references) > 30
    tests = defined_tests()
    missing = []
    for reference in references:
        words = reference.split()
        match = _REFERENCE.fullmatch(words[0]) if words else None
        if match is None or not any(match.groups()):
            continue  # prose in the column ("real quotes and reports …")
        file, name = match.groups()
        if file is not None and not (ROOT / file).is_file():
            missing.append(file)
        if name is not None and name not in tests:
            missing.append(name)
    assert missing == []

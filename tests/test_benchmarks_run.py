"""The CAS load benchmark still drives the CAS as a runtime would, without errors.

It speaks the attestation protocol on its own (for speed), so a protocol change
that forgets it would leave a benchmark that measures only refusals. A short run
must end with zero errors in every operation; no timing is judged.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "cas_load.py"


def test_cas_load_runs_every_operation_without_errors() -> None:
    done = subprocess.run(
        [sys.executable, str(BENCHMARK), "--only", "sqlite", "--clients", "2", "--seconds", "1"],
        capture_output=True, text=True, timeout=240)
    assert done.returncode in (0, 1), done.stderr[-2000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    for operation in ("create", "attest", "tag", "commit"):
        figures = summary["sqlite"][operation]
        assert figures["errors"] == 0 and figures["ops"] > 0, (operation, figures)

"""A small benchmarks/plan_check.py: the planner's predicted peak against the CPU allocator's own
measured peak of the same real iteration, within 10%, for several kinds of plan (the tiny prior;
the full-size rows are benchmarks/results/plan_check/)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(res=32, batch_real=8, width=16)


@pytest.mark.parametrize("row", ["recompute", "stored-sac", "stored-2-of-4", "class-groups", "bf16"])
def test_the_planned_peak_is_within_ten_percent_of_the_measured_one(row):
    # A fresh process per row: the allocator's counter is process-wide.
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); from benchmarks.plan_check import measure_row; "
            "print('ROW ' + json.dumps(measure_row('tiny', sys.argv[2], json.loads(sys.argv[3]), threads=1)))")
    done = subprocess.run([sys.executable, "-c", code, str(ROOT), row, json.dumps(SMALL)], capture_output=True,
                          text=True, env=dict(os.environ, HF_HUB_OFFLINE="1", LD3M_FAST_PLANNER_CACHE="0"))
    lines = [line[4:] for line in done.stdout.splitlines() if line.startswith("ROW ")]
    assert done.returncode == 0 and lines, done.stderr[-2000:]
    result = json.loads(lines[-1])
    predicted, measured = result["predicted_peak_bytes"], result["measured_peak_bytes"]
    assert 0.9 * predicted <= measured <= 1.1 * predicted, result
    assert result["measured_resident_bytes"] < measured  # the weights were counted before the iteration

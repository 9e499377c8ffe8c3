"""pytest-benchmark suites: `python -m pytest benchmarks/suites --benchmark-only`.

Save a run with `--benchmark-save NAME` (JSON under .benchmarks/, which pytest-benchmark names after
the machine, Python and bitness) and compare a later one against it with
`--benchmark-compare NAME` (`--benchmark-compare-fail=median:10%` makes a slowdown fail). The
default test run does not collect these (pyproject's testpaths is tests/). Each benchmark runs one
thread unless it says otherwise, and the machine info names the device and the torch build.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run from a checkout, installed or not
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_benchmark_update_machine_info(config, machine_info):
    from ld3m_fast._host import cpu_model
    from ld3m_fast.ops import backend_report

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU: {cpu_model()}"
    machine_info["device"] = device
    machine_info["torch"] = torch.__version__
    machine_info["threads"] = torch.get_num_threads()
    machine_info["op_backends"] = backend_report()


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

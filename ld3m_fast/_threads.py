"""How many CPU threads torch gets by default, and how they wait.

torch's default is one OpenMP thread per core. On a small machine that another
program shares, that collapses: a parallel region waits for its slowest thread,
whose core is busy, while the others spin. Measured on a 2-core workstation with
one competing process: 49-167 s per iteration of the embedded default instead
of ~2 s. So a run uses as many threads as the cores that are idle when it starts
(at least 1), and OpenMP threads spin only briefly before they sleep when they wait.

The count is a setting of the run (`DistillConfig.threads`): it is recorded, and a
resume keeps it, because a different thread count can change the order of
floating-point reductions and a resumed run would no longer be bit-identical.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

_SAMPLE_SECONDS = 0.25


def set_wait_policy() -> None:
    """Let waiting OpenMP threads spin only briefly, then sleep (only before torch loads OpenMP).

    Measured on the embedded default (this project's idle 2-core AMD EPYC, 2 threads, 12
    iterations, whole command): libgomp's default spin 18.9 s, GOMP_SPINCOUNT=10000 20.6 s,
    OMP_WAIT_POLICY=PASSIVE 31.8 s (a sleeping thread is woken for each of thousands of small
    ops), 1 thread 24.4 s. A short spin keeps most of the speed, and a thread whose core another
    program takes over stops burning it soon. A user's OMP_WAIT_POLICY or GOMP_SPINCOUNT wins.
    """
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ.setdefault("GOMP_SPINCOUNT", "10000")


def usable_cores() -> int:
    """Cores this process may run on: the affinity mask, capped by a cgroup CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    quota = _cgroup_quota()
    if quota is not None:
        cores = min(cores, max(1, int(quota)))
    return max(1, cores)


def _cgroup_quota() -> float | None:
    """CPUs allowed by a cgroup v2 `cpu.max` or v1 `cpu.cfs_quota_us`, or None."""
    try:
        text = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if text and text[0] != "max":
            return int(text[0]) / int(text[1])
    except (OSError, ValueError, IndexError):
        pass
    try:
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        if quota > 0 and period > 0:
            return quota / period
    except (OSError, ValueError):
        pass
    return None


def _cpu_times() -> dict[int, tuple[int, int]] | None:
    """Per-CPU (busy, total) jiffies from /proc/stat, or None where there is none."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return None
    result = {}
    for line in lines:
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit():
            values = [int(v) for v in fields[:8]]
            idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
            result[int(name[3:])] = (sum(values) - idle, sum(values))
    return result


def idle_cores(sample_seconds: float = _SAMPLE_SECONDS) -> float | None:
    """How many of this process's cores were idle over a short sample, or None if unknown."""
    before = _cpu_times()
    if not before:
        return None
    time.sleep(sample_seconds)
    after = _cpu_times() or {}
    try:
        allowed = os.sched_getaffinity(0)
    except (AttributeError, OSError):
        allowed = set(before)
    idle = 0.0
    for cpu in allowed:
        if cpu in before and cpu in after:
            busy = after[cpu][0] - before[cpu][0]
            total = after[cpu][1] - before[cpu][1]
            idle += 1.0 - busy / total if total > 0 else 1.0
    return idle


def default_threads() -> int:
    """Threads for a run started now: the idle cores (rounded down, at least 1).

    One competing busy process on a 2-core machine gives 1 thread; an idle machine gives 2.
    """
    cores = usable_cores()
    idle = idle_cores()
    if idle is None:
        return cores
    return max(1, min(cores, int(idle + 0.2)))


def check_threads(threads: int, flag: str = "--threads") -> int:
    """`threads`, refused in one line (an `LD3MError`) when below 1 or above the cores this
    process may use: more OpenMP threads than cores only wait for each other (10,000 of them
    made a 2-core machine unusable for minutes and ended in a segfault)."""
    from .errors import LD3MError

    if threads < 1:
        raise LD3MError(f"{flag} must be >= 1, got {threads}")
    cores = usable_cores()
    if threads > cores:
        raise LD3MError(f"{flag} {threads} is more than the {cores} core(s) this process may use (its CPU "
                        f"affinity and cgroup quota); give --threads {cores} or fewer")
    return threads


def apply_threads(threads: int | None) -> None:
    """Set torch's intra-op thread count (None: leave torch's choice)."""
    if threads is None:
        return
    import torch

    if torch.get_num_threads() != threads:
        torch.set_num_threads(int(threads))

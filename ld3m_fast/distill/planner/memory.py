"""How much memory a plan may fill: the budget, the reserve, and what is usable.

    usable = budget - reserve

The **budget** is the device memory the run has: `--memory-budget` when given (a card's size,
or what a job may take), else what the device has free when the run starts
(`torch.cuda.mem_get_info` on CUDA, which already excludes the CUDA context this process
created and every other process's memory; `MemAvailable` on the CPU).

The **reserve** is what the planner's figure does not count. The planner predicts the bytes of
live tensor storage, which is what `torch.cuda.max_memory_allocated` measures. On a real card
the same tensors take more, for reasons PyTorch's CUDA notes (docs/source/notes/cuda.rst,
"Memory management", "cuBLAS workspaces", "Optimizing memory usage with PYTORCH_CUDA_ALLOC_CONF")
describe:
- the caching allocator rounds every block up (to 512 B below 1 MiB, to 2 MiB above), serves
  large requests from segments of at least 20 MiB and can only reuse a cached block for a
  request that fits inside it: memory reserved by the allocator exceeds memory allocated, and a
  request can fail although enough memory is free in pieces (fragmentation; the notes' remedies
  are `max_split_size_mb` and `expandable_segments`). Our iteration frees and reallocates the
  same few sizes per step, the benign case: a few percent of the peak;
- library workspaces: cuBLAS keeps one workspace per (handle, stream) until exit (8 MiB by
  default, 32 MiB on Hopper, `CUBLAS_WORKSPACE_CONFIG`), cuDNN asks for convolution workspaces
  of up to hundreds of MiB, and attention kernels allocate their own scratch, none of which
  the planner sees;
- the CUDA context and loaded kernels (300 MiB to over 1 GiB) are not allocator memory at all;
  a budget given by hand (a card's nominal size) still contains them.
The default reserve is therefore 1 GiB (context, kernels, workspaces) plus 5% of the budget
(rounding and fragmentation, and the planner's own error against measured peaks, within a
few percent on this CPU: benchmarks/results/plan_check/). `--memory-reserve` sets it: a size
(`4GiB`) or a share of the budget (`8%`).
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

from ...errors import LD3MError

DEFAULT_RESERVE_BYTES = 2**30
DEFAULT_RESERVE_SHARE = 0.05

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str, what: str = "memory size") -> int:
    """'24GiB', '8 GB', '512MiB', '1e9' -> bytes (positive and finite, else one line)."""
    match = re.fullmatch(r"\s*([0-9.]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    if not match or match.group(2).lower() not in _UNITS:
        raise LD3MError(f"cannot read the {what} {text!r}; write e.g. 24GiB, 40GB or 512MiB")
    try:
        value = float(match.group(1)) * _UNITS[match.group(2).lower()]
    except ValueError:
        raise LD3MError(f"cannot read the {what} {text!r}; write e.g. 24GiB, 40GB or 512MiB") from None
    if not math.isfinite(value) or value <= 0 or value > 2**60:
        raise LD3MError(f"the {what} {text!r} must be a positive size below 1 EiB")
    return int(value)


def format_bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def reserve_bytes(budget: int, reserve: str | None = None) -> int:
    """The reserve for `budget`: `reserve` ('4GiB' or '8%'), or the default (module docstring)."""
    if reserve is None:
        return int(DEFAULT_RESERVE_BYTES + DEFAULT_RESERVE_SHARE * budget)
    text = str(reserve).strip()
    if text.endswith("%"):
        try:
            share = float(text[:-1])
        except ValueError:
            share = math.nan
        if not 0 <= share < 100:
            raise LD3MError(f"--memory-reserve {reserve!r}: a share must be a number in [0, 100)%")
        return int(share / 100 * budget)
    if text in ("0", "0B"):
        return 0
    return parse_bytes(text, "--memory-reserve")


@dataclass(frozen=True)
class MemoryBudget:
    """What a plan may fill (`usable`) and where that figure comes from."""

    budget: int       # device memory the run has (given, or free at start)
    reserve: int      # left out for what the planner does not count
    source: str       # "--memory-budget" or what was measured

    @property
    def usable(self) -> int:
        return self.budget - self.reserve

    def describe(self) -> str:
        return (f"{format_bytes(self.usable)} usable = {format_bytes(self.budget)} ({self.source}) - "
                f"{format_bytes(self.reserve)} reserve")


def device_free_memory(device) -> tuple[int, str]:
    """(bytes free on `device` now, how that was measured)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free), f"free on {torch.cuda.get_device_name(device)} at start"
    return _available_ram(), "RAM available at start"


def _available_ram() -> int:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def memory_budget(budget: str | None, reserve: str | None, device="cpu") -> MemoryBudget:
    """The budget of a plan: `--memory-budget` or the device's free memory, less the reserve."""
    if budget is not None:
        total, source = parse_bytes(budget, "--memory-budget"), "--memory-budget"
    else:
        total, source = device_free_memory(device)
    kept = reserve_bytes(total, reserve)
    if kept >= total:
        raise LD3MError(f"--memory-reserve {format_bytes(kept)} leaves nothing of the {format_bytes(total)} "
                        f"budget ({source}); lower --memory-reserve or raise --memory-budget")
    return MemoryBudget(total, kept, source)


__all__ = ["MemoryBudget", "device_free_memory", "format_bytes", "memory_budget", "parse_bytes", "reserve_bytes"]

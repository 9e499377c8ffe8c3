"""Host-side values (Python ints from RNG draws, index bookkeeping) that stay real.

The planner runs a whole distillation iteration under `FakeTensorMode`, where
reading a tensor's value is impossible. The few places that turn a draw into
a Python int (which class, which expert, which augmentation) do it inside
`host_values()`, on real CPU tensors and real `torch.Generator`s, so the same
code runs for real and under the planner and consumes the generators the same way.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch


@contextmanager
def host_values():
    """Real tensors inside, even when a FakeTensorMode is active outside."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily():
        yield


def draw_int(high: int, generator: torch.Generator, low: int = 0) -> int:
    """A Python int uniform in [low, high) from `generator` (consumed as torch.randint would)."""
    with host_values():
        return int(torch.randint(low, high, (1,), generator=generator, device=generator.device))


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one), for benchmark reports."""
    import platform
    from pathlib import Path

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()

"""Choose chunk size and dtype for a memory budget from simulated iterations."""
from __future__ import annotations

import re
from dataclasses import dataclass, replace

from ..errors import LD3MError
from .simulate import Estimate, IterationSpec, estimate

# Relative arithmetic throughput used to rank candidates that fit. An assumption,
# not a measurement: tensor-core GPUs run bf16 matmuls at least twice as fast as
# fp32. Among equal costs the larger chunk wins (fewer, larger kernel launches).
THROUGHPUT = {"fp32": 1.0, "bf16": 2.0}

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """'24GiB', '8 GB', '512MiB', '1e9' -> bytes."""
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([A-Za-z]*)\s*", str(text))
    if not match or match.group(2).lower() not in _UNITS:
        raise LD3MError(f"cannot read the memory size {text!r}; write e.g. 24GiB, 40GB or 512MiB")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def format_bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


@dataclass
class Candidate:
    estimate: Estimate
    fits: bool

    @property
    def cost(self) -> float:
        return self.estimate.flops / THROUGHPUT[self.estimate.spec.dtype]


def candidate_chunks(spec: IterationSpec, requested=None) -> list[int]:
    """Chunk sizes worth trying: divisors and multiples of ipc that divide the image count."""
    if requested:
        return sorted(set(int(c) for c in requested))
    n = spec.images
    options = {1, 2, 5, 10, 20, 50, spec.ipc, n}
    return sorted(c for c in options if c <= n and n % c == 0 and (c % spec.ipc == 0 or spec.ipc % c == 0))


def plan(spec: IterationSpec, budget_bytes: int, *, chunks=None, dtypes=("fp32", "bf16"),
         log=None) -> tuple[list[Candidate], Candidate | None]:
    """Estimate every (chunk, dtype) candidate; return them and the cheapest that fits."""
    candidates = []
    for dtype in dtypes:
        if dtype not in THROUGHPUT:
            raise LD3MError(f"unknown dtype {dtype!r}; choose from {', '.join(THROUGHPUT)}")
        for chunk in candidate_chunks(spec, chunks):
            result = estimate(replace(spec, chunk=chunk, dtype=dtype))
            candidates.append(Candidate(result, result.peak_bytes <= budget_bytes))
            if log is not None:
                log(f"  chunk {chunk:>4} {dtype}: peak {format_bytes(result.peak_bytes)}, "
                    f"{result.tflops:.1f} TFLOP")
    fitting = [c for c in candidates if c.fits]
    best = min(fitting, key=lambda c: (c.cost, -(c.estimate.spec.chunk or 0))) if fitting else None
    return candidates, best


def format_table(candidates: list[Candidate], best: Candidate | None, budget_bytes: int) -> str:
    lines = ["| chunk | dtype | peak memory | denoiser+decoder+student TFLOP/iter | fits "
             f"{format_bytes(budget_bytes)} | choice |",
             "|---:|---|---:|---:|---|---|"]
    for c in candidates:
        e = c.estimate
        lines.append(f"| {e.spec.chunk} | {e.spec.dtype} | {format_bytes(e.peak_bytes)} | "
                     f"{e.tflops:.1f} | {'yes' if c.fits else 'no'} | {'<-' if c is best else ''} |")
    return "\n".join(lines)

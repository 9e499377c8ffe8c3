"""Choose how to differentiate the chain, the chunk sizes and the dtype for a memory budget.

A candidate is (mode, chunk, decoder_chunk, dtype), where the mode is how the "recompute"
chain treats its steps (`ld3m_fast.generator`): pure recompute (2 forwards + 1 backward per
step), or its last k steps stored from the render pass, either whole graphs (1 + 1) or under
selective activation checkpointing that keeps only the outputs of ops doing at least N FLOPs
per output element. Every candidate's peak and FLOPs come from a simulated iteration of the
real code path (`ld3m_fast.planner.simulate`); `plan` returns the cheapest that fits.

The search uses three facts of this pipeline instead of simulating every combination:
- FLOPs depend on the mode and not on chunk or decoder_chunk (both only split the same work),
  and neither does what a mode keeps per image from the render pass (the "distill" phase's
  peak minus pure recompute's, over the images live at once). One probe per mode at a cheap
  chunk gives both;
- the peak only falls as chunk or decoder_chunk shrink. A mode that does not fit at the
  smallest of both fits nowhere; the first mode in cost order that fits there wins, and the
  largest chunk (then decoder_chunk) at which it still fits is taken;
- a mode's peak at the smallest chunk is at least pure recompute's there plus what it keeps
  for the other chunks' images live with it (all of them, or for DM and DC one class group:
  `ld3m_fast.distill.iteration.render_groups`): modes over budget by that bound are not
  simulated there.
Every row the planner reports was simulated (or interpolated in k, see `estimate`); the rows
it skipped could not have won.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass, replace

from ..errors import LD3MError
from .simulate import Estimate, IterationSpec, estimate, stored_together

# Relative arithmetic throughput used to rank candidates that fit. An assumption,
# not a measurement: tensor-core GPUs run bf16 matmuls at least twice as fast as
# fp32. Among equal costs the larger chunk wins (fewer, larger kernel launches).
THROUGHPUT = {"fp32": 1.0, "bf16": 2.0}

# Stored-step counts tried by default, as fractions of T (0 = pure recompute).
STORE_FRACTIONS = (0.0, 0.25, 0.5, 0.75, 1.0)
# Selective-checkpointing levels tried by default: thresholds keeping the ops that hold about
# this share of the denoiser's forward FLOPs, ranked by FLOPs per output element (= per byte).
SAC_SHARES = (0.15, 0.3, 0.5, 0.75, 0.85, 1.0)
GRAPH = "graph"  # sac level of a stored step that keeps its whole graph

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


def mode_name(spec: IterationSpec) -> str:
    """'recompute', 'graph last k' or 'sac>=N last k' (k of T steps stored)."""
    if spec.grad_mode != "recompute":
        return spec.grad_mode
    if not spec.store_steps:
        return "recompute"
    kept = GRAPH if spec.sac_min_flops is None else f"sac>={spec.sac_min_flops:g}"
    return f"{kept} last {spec.store_steps}/{spec.steps}"


@dataclass
class Candidate:
    estimate: Estimate
    fits: bool

    @property
    def spec(self) -> IterationSpec:
        return self.estimate.spec

    @property
    def mode(self) -> str:
        return mode_name(self.spec)

    @property
    def cost(self) -> float:
        return self.estimate.flops / THROUGHPUT[self.spec.dtype]

    def summary(self) -> dict:
        """The JSON row: {mode, chunk, decoder_chunk, dtype, peak_bytes, flops, fits, ...}."""
        s = self.spec
        return {"mode": self.mode, "chunk": s.chunk, "decoder_chunk": s.decoder_chunk or s.chunk,
                "dtype": s.dtype, "peak_bytes": int(self.estimate.peak_bytes),
                "flops": int(self.estimate.flops), "fits": self.fits,
                "store_steps": s.store_steps, "sac_min_flops": s.sac_min_flops,
                "phase_peaks": {k: int(v) for k, v in self.estimate.phase_peaks.items()},
                "method": self.estimate.method}


def candidate_chunks(spec: IterationSpec, requested=None) -> list[int]:
    """Chunk sizes worth trying: divisors and multiples of ipc that divide the image count."""
    if requested:
        return sorted(set(int(c) for c in requested))
    n = spec.images
    options = {1, 2, 5, 10, 20, 50, spec.ipc, n}
    return sorted(c for c in options if c <= n and n % c == 0 and (c % spec.ipc == 0 or spec.ipc % c == 0))


def candidate_decoder_chunks(chunk: int, requested=None) -> list[int]:
    """Decoder pieces worth trying for a chain chunk: 1, 2, 5, 10, ... up to the chunk itself."""
    if requested:
        return sorted(set(min(int(d), chunk) for d in requested))
    return sorted({d for d in (1, 2, 5, 10, 20, 50) if d < chunk} | {chunk})


def store_counts(steps: int, requested=None) -> list[int]:
    """Stored-step counts k to try: 0, T/4, T/2, 3T/4, T (rounded, distinct)."""
    if requested is not None:
        counts = sorted(set(int(k) for k in requested))
        bad = [k for k in counts if not 0 <= k <= steps]
        if bad:
            raise LD3MError(f"stored steps must be in 0..{steps} (T), got {bad[0]}")
        return counts
    return sorted({round(f * steps) for f in STORE_FRACTIONS})


@functools.lru_cache(maxsize=32)
def _denoiser_profile(prior: str, res: int, dtype: str) -> tuple[tuple[float, float], ...]:
    """(FLOPs per output element, FLOPs) of every counted op of one denoiser call on one image."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import flop_registry

    from ..generator import flops_per_output_element, render_size
    from .priors import build_planning_prior
    from .simulate import DTYPES

    rows = []

    class _Profile(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            formula = flop_registry.get(func._overloadpacket)
            per_element = flops_per_output_element(func, args)
            if formula is not None and per_element > 0:
                rows.append((per_element, float(formula(*args, **(kwargs or {}), out_val=out))))
            return out

    with FakeTensorMode(allow_non_fake_inputs=True):
        p = build_planning_prior(prior)
        z = torch.zeros(1, *p.latent_shape(render_size(p, res)))
        cond = torch.zeros(1, p.embedding_dim)
        t = torch.full((1,), 500, dtype=torch.long)
        with torch.no_grad(), torch.autocast("cpu", dtype=DTYPES[dtype], enabled=dtype != "fp32"), _Profile():
            p.eps(z, t, cond)
    return tuple(rows)


def sac_levels(spec: IterationSpec, shares=SAC_SHARES) -> list[float]:
    """Thresholds (FLOPs per output element) keeping the denoiser ops that hold at least each
    share of its forward FLOPs, best FLOPs-per-byte first; distinct, highest first."""
    rows = sorted(_denoiser_profile(spec.prior, spec.res, spec.dtype), key=lambda r: -r[0])
    total = sum(f for _, f in rows) or 1.0
    levels, done, i = [], 0.0, 0
    for share in sorted(shares):
        while i < len(rows) and done < share * total - 1e-9:
            done += rows[i][1]
            i += 1
        if i:
            level = rows[i - 1][0]
            while i < len(rows) and rows[i][0] == level:  # an op class is kept whole
                done += rows[i][1]
                i += 1
            if level not in levels:
                levels.append(level)
    return sorted(levels, reverse=True)


def candidate_modes(spec: IterationSpec, store_steps=None, sac=None) -> list[tuple[int, float | None]]:
    """(store_steps, sac_min_flops) pairs; sac None = whole graphs. k = 0 appears once."""
    if spec.grad_mode != "recompute":
        return [(0, None)]
    levels = list(sac) if sac is not None else sac_levels(spec) + [None]
    modes = []
    for k in store_counts(spec.steps, store_steps):
        modes += [(0, None)] if k == 0 else [(k, level) for level in levels]
    return modes


def plan(spec: IterationSpec, budget_bytes: int, *, chunks=None, dtypes=("fp32", "bf16"),
         decoder_chunks=None, store_steps=None, sac=None, log=None) -> tuple[list[Candidate], Candidate | None]:
    """Search (mode, chunk, decoder_chunk, dtype) for the cheapest candidate that fits.

    chunks, decoder_chunks, store_steps (k values) and sac (thresholds; None in the list =
    whole graphs) fix the candidates; None = automatic (for store_steps: 0, T/4, T/2, 3T/4,
    T, and per level the largest k of 1..T-1 that fits the budget). Returns (every candidate simulated,
    the choice or None). Cost = FLOPs / THROUGHPUT[dtype] (selective checkpointing +0.5%, for
    the pointwise ops it recomputes that FLOPs do not count); among equal costs the larger
    chunk, then the larger decoder chunk wins.
    """
    for dtype in dtypes:
        if dtype not in THROUGHPUT:
            raise LD3MError(f"unknown dtype {dtype!r}; choose from {', '.join(THROUGHPUT)}")
    chain_chunks = candidate_chunks(spec, chunks)
    recompute = spec.grad_mode == "recompute"
    pieces = {c: candidate_decoder_chunks(c, decoder_chunks) if recompute else [None] for c in chain_chunks}
    modes = candidate_modes(spec, store_steps, sac)
    results: dict[IterationSpec, Candidate] = {}

    def evaluate(s: IterationSpec) -> Candidate:
        if s not in results:
            e = estimate(s)
            results[s] = Candidate(e, e.peak_bytes <= budget_bytes)
            if log is not None:
                log(f"  {mode_name(s):>22} chunk {s.chunk:>4} decoder {s.decoder_chunk or s.chunk:>4} "
                    f"{s.dtype}: peak {format_bytes(e.peak_bytes)}, {e.tflops:.1f} TFLOP"
                    f"{'' if results[s].fits else ' (does not fit)'}")
        return results[s]

    def at(dtype, mode, chunk, piece) -> IterationSpec:
        k, level = mode
        return replace(spec, dtype=dtype, chunk=chunk, decoder_chunk=piece if recompute else None,
                       store_steps=k, sac_min_flops=level if k else None)

    # 1. Probes: one cheap chunk per (dtype, mode) for the cost and for what the mode keeps
    #    (its "distill"-phase peak minus pure recompute's: the stored state of every image).
    probe_chunk = max([c for c in chain_chunks if c <= max(spec.ipc, 10)] or chain_chunks[:1])
    smallest = chain_chunks[0]
    lean = {}

    def bound(dtype, mode, *, record=True) -> tuple[float, float]:
        """(cost, lower bound of the peak at the smallest chunk and decoder chunk).

        The bound: the distill phase (chunk-free), or pure recompute's peak at the smallest
        chunk plus what the mode keeps for the images outside the chunk being back-propagated
        that are live with it (`stored_together`: every image, or a per-class algorithm's class
        group; chunks are alike, so recompute's peak is reached in the group's first chunk,
        while the group's other chunks' stored state is still live)."""
        spec_at = at(dtype, mode, probe_chunk, pieces[probe_chunk][0])
        probe = evaluate(spec_at) if record else Candidate(estimate(spec_at), False)
        base = estimate(at(dtype, (0, None), probe_chunk, pieces[probe_chunk][0]))
        distill = probe.estimate.phase_peaks.get("distill", 0.0)
        floor = distill
        if mode[0] and distill <= budget_bytes:
            if dtype not in lean:
                lean[dtype] = evaluate(at(dtype, (0, None), smallest, pieces[smallest][0])).estimate.peak_bytes
            kept = distill - base.phase_peaks.get("distill", 0.0)  # for the probe's live images
            per_image = kept / stored_together(spec_at)
            floor = max(floor, lean[dtype] + per_image * (stored_together(spec_at, smallest) - smallest))
        # FLOPs count matmuls, convolutions and attention only; selective checkpointing also
        # recomputes pointwise ops, so within 0.5% a whole graph is preferred.
        return probe.cost * (1.005 if mode[0] and mode[1] is not None else 1.0), floor

    order = []
    for dtype in dtypes:
        for mode in modes:
            order.append((*bound(dtype, mode), dtype, mode))
        if store_steps is None and recompute:
            # Any count, not only the default ones: per level, the most stored steps that fit
            # the budget at the smallest chunks (fewer cost more FLOPs). Interpolated between
            # the level's k = 0 and k = T walks, so the search walks nothing new; candidates
            # that do not fit are not listed.
            for level in sorted({m[1] for m in modes if m[0]}, key=lambda v: (v is None, v or 0.0)):
                for k in range(spec.steps - 1, 0, -1):
                    mode = (k, level)
                    if bound(dtype, mode, record=False)[1] <= budget_bytes and \
                            estimate(at(dtype, mode, smallest, pieces[smallest][0])).peak_bytes <= budget_bytes:
                        if mode not in modes:  # a default count is in the order already
                            order.append((*bound(dtype, mode), dtype, mode))
                        break
    order.sort(key=lambda o: (o[0], -o[3][0]))

    # 2. In cost order: the first mode that fits at the smallest chunk and decoder chunk wins
    #    (modes whose lower bound there is over budget are not simulated there); then the
    #    largest chunk (and decoder chunk) at which it still fits.
    best = None
    for _, floor, dtype, mode in order:
        if floor > budget_bytes or not evaluate(at(dtype, mode, smallest, pieces[smallest][0])).fits:
            continue
        for chunk in chain_chunks:
            fitting = None
            for piece in reversed(pieces[chunk]):
                candidate = evaluate(at(dtype, mode, chunk, piece))
                if candidate.fits:
                    fitting = candidate
                    break
            if fitting is None:
                break
            best = fitting
        break
    candidates = sorted(results.values(), key=lambda c: (c.spec.dtype, c.cost, -(c.spec.chunk or 0),
                                                          -(c.spec.decoder_chunk or 0)))
    return candidates, best


def released_reference(spec: IterationSpec, chunk: int = 10) -> Estimate:
    """The released scheme in the same setting: its default chunk, its full-batch student, fp32,
    its UNet's transformer blocks checkpointed inside (as released)."""
    return estimate(replace(spec, grad_mode="released", chunk=min(chunk, spec.images), micro_batch=None,
                            dtype="fp32", decoder_chunk=None, store_steps=0, sac_min_flops=None,
                            checkpoint_attention=True))


def format_table(candidates: list[Candidate], best: Candidate | None, budget_bytes: int) -> str:
    lines = ["| mode | chunk | decoder chunk | dtype | peak memory | TFLOP/iter | fits "
             f"{format_bytes(budget_bytes)} | choice |",
             "|---|---:|---:|---|---:|---:|---|---|"]
    for c in candidates:
        e, s = c.estimate, c.spec
        lines.append(f"| {c.mode} | {s.chunk} | {s.decoder_chunk or s.chunk} | {s.dtype} | "
                     f"{format_bytes(e.peak_bytes)} | {e.tflops:.1f} | {'yes' if c.fits else 'no'} | "
                     f"{'<-' if c is best else ''} |")
    return "\n".join(lines)

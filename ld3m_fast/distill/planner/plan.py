"""Choose how to differentiate the chain and the chunk sizes for a memory budget.

A candidate is (mode, chunk, decoder_chunk, micro_batch): the run's config with the knobs it
leaves unset filled (`KNOBS`; `search_space`), where the mode is how the "recompute"
chain treats its steps (`ld3m_fast.generator`): pure recompute (2 forwards + 1 backward per
step), or its last k steps stored from the render pass, either whole graphs (1 + 1) or under
selective activation checkpointing that keeps only the outputs of ops doing at least N FLOPs
per output element. Every candidate's peak and FLOPs come from a simulated iteration of the
real code path (`ld3m_fast.distill.planner.simulate`); `plan` returns the cheapest that fits.
Every other setting (T, the algorithm, the dtype, eta, --released-compat, ...) is the run's; a
bf16 or fp16 run is walked under that autocast (fp16's gradient scaler adds no tensor of note) and
priced by its FLOPs like fp32.

The search uses four facts of this pipeline instead of simulating every combination:
- FLOPs depend on the mode (and a little on the student's micro-batch) and not on chunk or
  decoder_chunk (both only split the same work), and neither does what a mode keeps per image
  from the render pass (the "distill" phase's peak minus pure recompute's, over the images live
  at once). One probe per mode at one chunk gives both;
- the peak only falls as chunk or decoder_chunk shrink: a mode that fits at the probe is placed
  at the largest chunk above it that still fits, one that does not at the largest below;
- a mode's peak at the smallest chunk is at least pure recompute's there plus what it keeps
  for the other chunks' images live with it (all of them, or for DM and DC one class group:
  `ld3m_fast.distill.iteration.render_groups`): modes over budget by that bound are not
  simulated below the probe;
- the student's micro-batch changes the distill phase alone: a smaller one is tried only for a
  mode whose distill phase is over budget.
Every row the planner reports was simulated (or interpolated in k, see `estimate`); the rows
it skipped could not have won.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

from ...errors import LD3MError
from ..config import DistillConfig
from .memory import format_bytes
from .simulate import Estimate, Walk, _progress, estimate, extrapolation_points, stored_together, uncached

logger = logging.getLogger(__name__)

# Stored-step counts tried by default, as fractions of T (0 = pure recompute).
STORE_FRACTIONS = (0.0, 0.25, 0.5, 0.75, 1.0)
# Selective-checkpointing levels tried by default: thresholds keeping the ops that hold about
# this share of the denoiser's forward FLOPs, ranked by FLOPs per output element (= per byte).
SAC_SHARES = (0.15, 0.3, 0.5, 0.75, 0.85, 1.0)
GRAPH = "graph"  # sac level of a stored step that keeps its whole graph
# Student micro-batches tried when the config leaves --micro-batch unset: the whole batch first.
MICRO_BATCHES = (None, 10)
# The knobs a plan chooses (the run's settings it may fill); every other setting is the config's.
KNOBS = ("chunk", "decoder_chunk", "store_steps", "sac_min_flops", "micro_batch")


def mode_name(walk: Walk) -> str:
    """'recompute', 'graph last k' or 'sac>=N last k' (k of T steps stored)."""
    config = walk.config
    if config.grad_mode != "recompute":
        return config.grad_mode
    if not config.store_steps:
        return "recompute"
    kept = GRAPH if config.sac_min_flops is None else f"sac>={config.sac_min_flops:g}"
    return f"{kept} last {config.store_steps}/{config.steps}"


def knobs_of(walk: Walk) -> dict:
    """The plan's knobs of `walk`, as `DistillConfig` settings (the command line of a choice)."""
    config = walk.config
    recompute = config.grad_mode == "recompute"
    return {"chunk": config.chunk, "decoder_chunk": (config.decoder_chunk or config.chunk) if recompute else None,
            "store_steps": config.store_steps or 0,
            "sac_min_flops": config.sac_min_flops if config.store_steps else None,
            "micro_batch": config.micro_batch}


def knob_flags(walk: Walk) -> str:
    """`--chunk 10 --decoder-chunk 1 ...`: the flags that give a run this plan."""
    knobs = knobs_of(walk)
    flags = [f"--chunk {knobs['chunk']}" if knobs["chunk"] else ""]
    if walk.config.grad_mode == "recompute" and knobs["decoder_chunk"]:
        flags.append(f"--decoder-chunk {knobs['decoder_chunk']}")
    if knobs["store_steps"]:
        flags.append(f"--store-steps {knobs['store_steps']}")
        if knobs["sac_min_flops"] is not None:
            flags.append(f"--sac-min-flops {knobs['sac_min_flops']:g}")
    if knobs["micro_batch"]:
        flags.append(f"--micro-batch {knobs['micro_batch']}")
    return " ".join(f for f in flags if f)


@dataclass
class Candidate:
    estimate: Estimate
    fits: bool

    @property
    def walk(self) -> Walk:
        return self.estimate.walk

    @property
    def mode(self) -> str:
        return mode_name(self.walk)

    @property
    def cost(self) -> float:
        return self.estimate.flops

    def summary(self) -> dict:
        """The JSON row: {mode, chunk, decoder_chunk, micro_batch, dtype, peak_bytes, flops, fits, ...}."""
        return {"mode": self.mode, **knobs_of(self.walk), "dtype": self.walk.config.dtype,
                "peak_bytes": int(self.estimate.peak_bytes), "flops": int(self.estimate.flops), "fits": self.fits,
                "phase_peaks": {k: int(v) for k, v in self.estimate.phase_peaks.items()},
                "method": self.estimate.method}


def candidate_chunks(walk: Walk, requested=None) -> list[int]:
    """Chunk sizes worth trying: divisors and multiples of ipc that divide the image count."""
    if requested:
        return sorted(set(int(c) for c in requested))
    n, ipc = walk.images, walk.config.ipc
    options = {1, 2, 5, 10, 20, 50, ipc, n}
    return sorted(c for c in options if c <= n and n % c == 0 and (c % ipc == 0 or ipc % c == 0))


def candidate_decoder_chunks(chunk: int, requested=None) -> list[int]:
    """Decoder pieces worth trying for a chain chunk: 1, 2, 5, 10, ... up to the chunk itself."""
    if requested:
        return sorted(set(min(int(d), chunk) for d in requested))
    return sorted({d for d in (1, 2, 5, 10, 20, 50) if d < chunk} | {chunk})


def candidate_micro_batches(walk: Walk, requested=None) -> list[int | None]:
    """Student micro-batches worth trying, the whole batch first (None)."""
    if requested:
        return list(dict.fromkeys(requested))
    return [m for m in MICRO_BATCHES if m is None or m < walk.images]


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
def _denoiser_profile(prior: str, res: int, dtype: str, released: bool) -> tuple[tuple[float, float], ...]:
    """(FLOPs per output element, FLOPs) of every counted op of one denoiser call on one image
    (at the side the chain renders at, `render_size`)."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import flop_registry

    from ...choices import torch_dtype
    from ...generator import flops_per_output_element, render_size
    from .priors import build_planning_prior

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
        z = torch.zeros(1, *p.latent_shape(render_size(p, res, released=released)))
        cond = torch.zeros(1, p.embedding_dim)
        t = torch.full((1,), 500, dtype=torch.long)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch_dtype(dtype), enabled=dtype != "fp32"), _Profile():
            p.eps(z, t, cond)
    return tuple(rows)


def sac_levels(walk: Walk, shares=SAC_SHARES) -> list[float]:
    """Thresholds (FLOPs per output element) keeping the denoiser ops that hold at least each
    share of its forward FLOPs, best FLOPs-per-byte first; distinct, highest first."""
    config = walk.config
    rows = sorted(_denoiser_profile(config.prior, config.res, config.dtype, config.released_compat), key=lambda r: -r[0])
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


def candidate_modes(walk: Walk, store_steps=None, sac=None) -> list[tuple[int, float | None]]:
    """(store_steps, sac_min_flops) pairs; sac None = whole graphs. k = 0 appears once."""
    if walk.config.grad_mode != "recompute":
        return [(0, None)]
    levels = list(sac) if sac is not None else sac_levels(walk) + [None]
    modes = []
    for k in store_counts(walk.config.steps, store_steps):
        modes += [(0, None)] if k == 0 else [(k, level) for level in levels]
    return modes


def plan(walk: Walk, budget_bytes: int, *, chunks=None, decoder_chunks=None, store_steps=None, sac=None,
         micro_batches=None, progress: bool = False) -> tuple[list[Candidate], Candidate | None]:
    """Search (mode, chunk, decoder_chunk, micro_batch) for the cheapest candidate that fits.

    `walk` gives every other setting (its own knob values are replaced). chunks, decoder_chunks,
    store_steps (k values), sac (thresholds; None in the list = whole graphs) and micro_batches
    fix the candidates; None = automatic (for store_steps: 0, T/4, T/2, 3T/4, T, and per level
    the largest k of 1..T-1 that fits). Returns (every candidate simulated, the choice or None).
    Cost = FLOPs (selective checkpointing +0.5%, for the pointwise ops it recomputes that FLOPs
    do not count); among equal costs the larger chunk, then the larger decoder chunk wins.
    progress: a bar over the walks still to make, with an estimate. Each walk is logged at DEBUG.

    The search (see the module docstring for the facts it rests on): every mode is probed at one
    chunk (FLOPs, and whether it fits there); modes are then placed cheapest first, each at the
    largest chunk and decoder chunk where it fits (up from the probe when it fits there, down
    otherwise), and the first that can be placed wins. Student micro-batches and stored-step
    counts that fit only at smaller chunks join the queue when a walk shows they may help.
    """
    import heapq

    chain_chunks = candidate_chunks(walk, chunks)
    recompute = walk.config.grad_mode == "recompute"
    pieces = {c: candidate_decoder_chunks(c, decoder_chunks) if recompute else [None] for c in chain_chunks}
    modes = candidate_modes(walk, store_steps, sac)
    micros = candidate_micro_batches(walk, micro_batches)
    steps = walk.config.steps
    results: dict[Walk, Candidate] = {}

    def evaluate(w: Walk) -> Candidate:
        if w not in results:
            e = estimate(w)
            results[w] = Candidate(e, e.peak_bytes <= budget_bytes)
            if logger.isEnabledFor(logging.DEBUG):
                knobs = knobs_of(w)
                logger.debug(f"  {mode_name(w):>22} chunk {knobs['chunk']:>4} decoder {knobs['decoder_chunk']:>4} "
                    f"micro-batch {knobs['micro_batch'] or 'all':>4}: peak {format_bytes(e.peak_bytes)}, "
                    f"{e.tflops:.1f} TFLOP{'' if results[w].fits else ' (does not fit)'}")
        return results[w]

    def at(micro, mode, chunk, piece=None) -> Walk:
        k, level = mode
        piece = pieces[chunk][0] if piece is None else piece
        return walk.at(chunk=chunk, decoder_chunk=piece if recompute else None, store_steps=k,
                       sac_min_flops=level if k else None, micro_batch=micro)

    def announce(walks) -> None:
        """Tell the progress bar how many walks the next stage makes."""
        points = [p for w in walks for p in extrapolation_points(w)]
        _progress.expect(len(uncached(points)), enabled=progress)

    probe = max([c for c in chain_chunks if c <= max(walk.config.ipc, 10)] or chain_chunks[:1])
    below = sorted((c for c in chain_chunks if c < probe), reverse=True)
    above = [c for c in chain_chunks if c > probe]
    smallest = chain_chunks[0]

    def cost(micro, mode) -> float:
        """FLOPs of the mode (from its probe; they do not depend on the chunks)."""
        flops = evaluate(at(micro, mode, probe)).estimate.flops
        return flops * (1.005 if mode[0] and mode[1] is not None else 1.0)

    def fitting(micro, mode, chunk, piece=None) -> Candidate | None:
        candidate = evaluate(at(micro, mode, chunk, piece))
        return candidate if candidate.fits else None

    def largest_piece(micro, mode, chunk) -> Candidate | None:
        announce([at(micro, mode, chunk, piece) for piece in pieces[chunk][-1:]])
        for piece in reversed(pieces[chunk]):
            candidate = fitting(micro, mode, chunk, piece)
            if candidate is not None:
                return candidate
        return None

    def floor(micro, mode) -> float:
        """A lower bound of the mode's peak at the smallest chunk: pure recompute's peak there plus
        what the mode keeps for the images live with the chunk being back-propagated
        (`stored_together`: every image, or a per-class algorithm's class group)."""
        probe_walk = at(micro, mode, probe)
        distill = evaluate(probe_walk).estimate.phase_peaks.get("distill", 0.0)
        if not mode[0] or distill > budget_bytes:
            return distill
        base = estimate(at(micro, (0, None), probe)).phase_peaks.get("distill", 0.0)
        per_image = (distill - base) / stored_together(probe_walk)
        announce([at(micro, (0, None), smallest)])
        lean = evaluate(at(micro, (0, None), smallest)).estimate.peak_bytes
        return max(distill, lean + per_image * (stored_together(probe_walk, smallest) - smallest))

    def place(micro, mode) -> Candidate | None:
        """The largest chunk (then decoder chunk) at which `mode` fits, or None."""
        if fitting(micro, mode, probe) is not None:
            best = largest_piece(micro, mode, probe)
            for chunk in above:
                announce([at(micro, mode, chunk)])
                if fitting(micro, mode, chunk) is None:
                    break
                best = largest_piece(micro, mode, chunk)
            return best
        if floor(micro, mode) > budget_bytes:
            return None
        for chunk in below:
            announce([at(micro, mode, chunk)])
            if fitting(micro, mode, chunk) is not None:
                return largest_piece(micro, mode, chunk)
        return None

    queue, queued = [], set()

    def push(micro, mode) -> None:
        if (micro, mode) not in queued:
            queued.add((micro, mode))
            heapq.heappush(queue, (cost(micro, mode), -mode[0], micros.index(micro), len(queued), mode))

    def most_stored(micro, level, chunk) -> int:
        """The most stored steps of `level` that fit at `chunk` (interpolated between the level's
        k = 0 and k = T walks there, so no new walk); 0 if none."""
        for k in range(steps - 1, 0, -1):
            if estimate(at(micro, (k, level), chunk)).peak_bytes <= budget_bytes:
                return k
        return 0

    first = micros[0]
    announce([at(first, mode, probe) for mode in modes])
    for mode in modes:
        push(first, mode)
    if store_steps is None and recompute:
        for level in dict.fromkeys(mode[1] for mode in modes if mode[0]):
            k = most_stored(first, level, probe)
            if k:
                push(first, (k, level))
    best = None
    while queue and best is None:
        *_, index, _, mode = heapq.heappop(queue)
        micro = micros[index]
        best = place(micro, mode)
        if best is not None:
            break
        # A smaller student micro-batch helps only where the student's phase is over budget.
        probe_peaks = evaluate(at(micro, mode, probe)).estimate.phase_peaks
        if index + 1 < len(micros) and probe_peaks.get("distill", 0.0) > budget_bytes:
            announce([at(micros[index + 1], mode, probe)])
            push(micros[index + 1], mode)
        # Fewer stored steps of this level may fit at the smaller chunks this mode was tried at.
        if mode[0] and store_steps is None and recompute:
            for chunk in below:
                if at(micro, (steps, mode[1]), chunk) in results:
                    k = most_stored(micro, mode[1], chunk)
                    if 0 < k < mode[0]:
                        push(micro, (k, mode[1]))
    _progress.close()
    candidates = sorted(results.values(), key=lambda c: (c.cost, -(c.walk.config.chunk or 0),
                                                          -(c.walk.config.decoder_chunk or 0)))
    return candidates, best


def released_reference(walk: Walk, chunk: int = 10) -> Estimate:
    """The released scheme in the same setting: its default chunk, its full-batch student, fp32,
    its UNet's transformer blocks checkpointed inside (as released)."""
    return estimate(walk.at(grad_mode="released", chunk=min(chunk, walk.images), micro_batch=None,
                            dtype="fp32", decoder_chunk=None, store_steps=None, sac_min_flops=None,
                            checkpoint_attention="on"))


def format_table(candidates: list[Candidate], best: Candidate | None, budget_bytes: int) -> str:
    lines = ["| mode | chunk | decoder chunk | micro-batch | dtype | peak memory | TFLOP/iter | fits "
             f"{format_bytes(budget_bytes)} | choice |",
             "|---|---:|---:|---:|---|---:|---:|---|---|"]
    for c in candidates:
        e, knobs = c.estimate, knobs_of(c.walk)
        lines.append(f"| {c.mode} | {knobs['chunk']} | {knobs['decoder_chunk']} | {knobs['micro_batch'] or 'all'} | "
                     f"{c.walk.config.dtype} | {format_bytes(e.peak_bytes)} | {e.tflops:.1f} | "
                     f"{'yes' if c.fits else 'no'} | {'<-' if c is best else ''} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- a run's plan


def planning_config(config: DistillConfig) -> DistillConfig:
    """`config` ready to plan: the method's defaults filled (the prior, batch_real, ...), the
    settings checked, and `res` resolved against the prior's architecture."""
    from dataclasses import replace

    from torch._subclasses.fake_tensor import FakeTensorMode

    from ...generator import released_timesteps
    from ..assemble import resolve_resolution
    from ..config import resolve_method_defaults
    from .priors import build_planning_prior

    config = resolve_method_defaults(config)
    config.check_method()
    with FakeTensorMode(allow_non_fake_inputs=True):
        prior = build_planning_prior(config.prior)
        res = resolve_resolution(prior, config.res, released=config.released_compat)
    if config.released_compat:  # a T the released sampler fails at: one line
        released_timesteps(len(prior.alphas_cumprod), config.steps)
    return replace(config, res=res)


def search_space(config: DistillConfig) -> dict:
    """`plan`'s keyword arguments for a config: the knobs it sets stay fixed, the unset ones are
    searched (chunk: an integer is fixed; None or 'auto' is searched)."""
    fixed = lambda value: None if value is None else [value]  # noqa: E731
    if config.store_steps is not None and config.sac_min_flops is None:
        sac = [None]  # a set --store-steps without --sac-min-flops keeps whole graphs
    else:
        sac = fixed(config.sac_min_flops)
    return dict(chunks=[config.chunk] if isinstance(config.chunk, int) else None,
                decoder_chunks=fixed(config.decoder_chunk), store_steps=fixed(config.store_steps), sac=sac,
                micro_batches=fixed(config.micro_batch))


def base_walk(config: DistillConfig, num_classes: int, world_size: int = 1) -> Walk:
    """The walk of `config` (from `planning_config`) with placeholder knobs for `plan` to replace."""
    from dataclasses import replace

    from ...distributed import class_share

    class_share(num_classes, 0, world_size)  # more processes than classes: one line
    chunk = config.chunk if isinstance(config.chunk, int) else None
    return Walk.of(replace(config, chunk=chunk), num_classes, world_size)


def choose_knobs(config: DistillConfig, num_classes: int, budget, *, world_size: int = 1,
                 progress: bool = True) -> tuple[dict, Candidate]:
    """--chunk auto: the planner's cheapest knobs that fit `budget` (a `MemoryBudget`) for this
    run (one rank's share of `world_size`). Returns (the knobs as settings, the choice)."""
    planned = planning_config(config)
    _, best = plan(base_walk(planned, num_classes, world_size), budget.usable, progress=progress,
                   **search_space(planned))
    if best is None:
        raise LD3MError(f"--chunk auto: nothing fits {budget.describe()}; set --micro-batch, lower --ipc or "
                        "raise --memory-budget")
    return knobs_of(best.walk), best


# After an out-of-memory error a plan must need less than the failed one was predicted to need.
OOM_SHRINK = 0.85


def replan_after_oom(setup, *, error_line: str, kept: str, resume: str, iteration: int) -> dict:
    """New chunk knobs for a run whose iteration ran out of memory, applied to `setup.iteration`:
    the cheapest plan for the memory free now (CUDA: free on the device plus what the caching
    allocator holds) and at most `OOM_SHRINK` of the failed plan's predicted peak; every knob is
    the planner's then, a fixed one too. Returns the plan's record; one line (an `LD3MError`)
    when nothing fits."""
    from dataclasses import replace

    import torch

    from ..assemble import apply_knobs
    from .memory import MemoryBudget, device_free_memory, reserve_bytes

    free = {knob: None for knob in KNOBS}
    planned = planning_config(replace(setup.config, **free))
    generator, algorithm = setup.iteration.generator, setup.iteration.algorithm
    running = dict(chunk=generator.chunk_size, decoder_chunk=generator.decoder_chunk,
                   store_steps=generator.store_steps or None,
                   sac_min_flops=generator.sac_min_flops if generator.store_steps else None,
                   micro_batch=getattr(algorithm, "micro_batch", None))
    world = 1
    failed = setup.plan.get("planned_peak_bytes") or estimate(
        Walk.of(replace(planned, **running), setup.iteration.num_classes, world)).peak_bytes
    usable = OOM_SHRINK * failed
    if setup.device.type == "cuda":
        now = device_free_memory(setup.device)[0] + torch.cuda.memory_reserved(setup.device)
        usable = min(usable, now - reserve_bytes(now, setup.config.memory_reserve))
    budget = MemoryBudget(int(usable), 0, "after an out-of-memory error")
    try:
        knobs, best = choose_knobs(planned, setup.iteration.num_classes, budget, progress=False)
    except LD3MError:
        raise LD3MError(f"out of memory at iteration {iteration} ({error_line}) and no plan fits the "
                        f"{format_bytes(usable)} left; stopped, {kept}. Lower --ipc, --batch-real or "
                        f"--micro-batch, or use a larger device, then resume with: {resume}") from None
    apply_knobs(setup.iteration, replace(planned, **knobs))
    return {"knobs": knobs, "flags": knob_flags(best.walk), "mode": best.mode,
            "planned_peak_bytes": int(best.estimate.peak_bytes), "tflops": best.estimate.tflops,
            "usable_bytes": int(usable), "failed_plan_peak_bytes": int(failed)}

"""Simulate one distillation iteration of the real code path under fake tensors.

`simulate(spec)` builds the prior (full size, no weights), the synthetic set,
the generator and the algorithm exactly as a run would, then runs
`ld3m_fast.distill.iteration.distill_iteration` under `FakeTensorMode` with the
live-storage tracker and the FLOP counter. Nothing is computed, but every tensor
the real iteration would allocate is allocated (as metadata) and freed when the
real one would be.

A full-size denoiser call costs about half a second of dispatch here, so a
T=20, 100-image iteration would take minutes to walk. `estimate(spec)` therefore
walks the real code at T in {1, 2} steps and at one and two "units" of images (a
unit is the smallest set of whole classes that also fills whole generator
chunks), and extrapolates each phase's peak (render / distill / backward) and
the FLOPs bilinearly in (T, images). The model is exact when each phase's peak
is bilinear in T and the image count, which holds for this pipeline (per-step
latents, stored steps and per-image state grow linearly, working memory is per
chunk, per class or per micro-batch); `tests/test_planner.py` checks the
extrapolation against a direct simulation.

Several processes (`world_size` > 1, `ld3m_fast.distributed`): each rank renders and
differentiates its own classes but holds the whole Z, c, their momentum and (at the end of
backward) their gradient. The estimate is one rank's: the busiest rank's classes simulated
(and extrapolated in classes) as above, plus the other ranks' rows of Z and c with their
momentum in every phase and their gradient in the backward phase, an upper bound (the
gradient is all-reduced in place; the backend's own buffers are not counted).
`estimate(spec, direct=True)` walks the rank's real iteration instead (tested against it).

Every walk is also kept on disk (`LD3M_FAST_CACHE`, default ~/.cache/ld3m_fast, under
planner/; `LD3M_FAST_PLANNER_CACHE=0` turns it off). A walk's peak and FLOPs do not depend
on the memory budget, so one search serves every budget, and a later `plan` or run reuses
the walks of an earlier one. The key is the whole spec, the prior's architecture (a named
prior's name, a folder's configuration files), and the code that was walked: the versions of
ld3m_fast, torch and diffusers and a hash of the package's sources (any code change misses).

Stored steps (`store_steps=k`, see `ld3m_fast.generator`) are walked at k = 0 and
k = T (both extrapolated as above); a k in between is interpolated linearly between
them. The FLOPs are exactly linear in k; each phase's peak is the largest of a few
terms linear in k, so the interpolated peak is an upper bound, up to the error of the
two extrapolated ends (tested too).
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from ..errors import LD3MError
from .measure import Measurement, PeakAndFlops, measure
from .priors import build_planning_prior

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PHASES = ("render", "distill", "backward")


@dataclass(frozen=True)
class IterationSpec:
    """One distillation iteration to plan (defaults: the paper's 256² setting).

    chunk: images per generator chunk (None = all at once); micro_batch: images
    per student micro-batch (None = full batch); dtype: "fp32" or "bf16" (autocast).
    decoder_chunk, store_steps, sac_min_flops: the "recompute" knobs of
    `LD3MGenerator`; checkpoint_attention: the released UNet's internal checkpointing
    of its transformer blocks (set it to model the released scheme as released).
    world_size: processes of the run; the spec is one rank's (the busiest: rank 0).
    """

    prior: str = "cin256-v2"
    res: int = 256
    ipc: int = 10
    num_classes: int = 10
    steps: int = 20
    guidance: float = 3.0
    skip: str | None = "x0"
    algorithm: str = "dm"
    grad_mode: str = "recompute"
    chunk: int | None = 10
    micro_batch: int | None = None
    dtype: str = "fp32"
    syn_steps: int = 10
    mtt_gradient: str = "truncated"
    batch_real: int = 256
    width: int = 128
    depth: int | None = None
    decoder_chunk: int | None = None
    store_steps: int = 0
    sac_min_flops: float | None = None
    checkpoint_attention: bool = False
    world_size: int = 1

    @property
    def local_classes(self) -> int:
        """Classes of the busiest rank (all of them in one process)."""
        from ..distributed import largest_share

        return largest_share(self.num_classes, self.world_size)

    @property
    def images(self) -> int:
        """Images one rank renders (all of them in one process)."""
        return self.ipc * self.local_classes

    @property
    def total_images(self) -> int:
        return self.ipc * self.num_classes

    def describe(self) -> dict:
        return asdict(self)


@dataclass
class Estimate(PeakAndFlops):
    """Peak bytes and FLOPs of one iteration (extrapolated or simulated directly)."""

    spec: IterationSpec
    peak_bytes: float
    flops: float
    phase_peaks: dict
    weights_bytes: int
    method: str


def _fake_trajectories(network, count: int = 1):
    from ..distill.buffers import ExpertTrajectory

    module = network.build()
    names = [n for n, _ in module.named_parameters()]
    shapes = [tuple(p.shape) for _, p in module.named_parameters()]
    size = sum(p.numel() for p in module.parameters())
    return [ExpertTrajectory(torch.zeros(4, size), names, shapes, {}, source="planner")
            for _ in range(count)]


def _build(spec: IterationSpec):
    """Everything one iteration touches, built inside the caller's FakeTensorMode."""
    from .._host import host_values
    from ..distill.algorithms import NetworkSpec, RealData, StepContext, build_algorithm
    from ..dsa import DSA
    from ..generator import LD3MGenerator, render_size
    from ..synthetic import SyntheticSet

    prior = build_planning_prior(spec.prior)
    if spec.res % prior.latent_factor:
        raise LD3MError(f"--res {spec.res} is not a multiple of the prior's latent factor {prior.latent_factor}")
    n = spec.total_images  # every rank holds the whole set; it renders `spec.images` of it
    with host_values():
        labels = torch.arange(spec.num_classes).repeat_interleave(spec.ipc)
        real_labels = torch.arange(spec.num_classes).repeat_interleave(spec.batch_real)
    render = render_size(prior, spec.res)
    Z = torch.zeros(n, *prior.latent_shape(render))
    c = torch.zeros(n, prior.embedding_dim)
    synthetic = SyntheticSet(Z, c, torch.zeros(n, dtype=torch.long), list(range(spec.num_classes)))
    synthetic.labels = labels  # real: class bookkeeping reads it on the host
    generator = LD3MGenerator(prior, spec.steps, guidance=spec.guidance, skip=spec.skip,
                              grad_mode=spec.grad_mode, chunk_size=spec.chunk,
                              render_size=render, output_size=None if spec.res == render else spec.res,
                              decoder_chunk=spec.decoder_chunk, store_steps=spec.store_steps,
                              sac_min_flops=spec.sac_min_flops,
                              checkpoint_attention=spec.checkpoint_attention)
    network = NetworkSpec(num_classes=spec.num_classes, res=spec.res, width=spec.width, depth=spec.depth)
    extra = dict(syn_steps=spec.syn_steps, gradient=spec.mtt_gradient) if spec.algorithm == "mtt" else {}
    algorithm = build_algorithm(spec.algorithm, network, batch_real=spec.batch_real,
                                micro_batch=spec.micro_batch,
                                trajectories=_fake_trajectories(network) if spec.algorithm == "mtt" else None,
                                **extra)
    real_images = torch.zeros(len(real_labels), 3, spec.res, spec.res, dtype=torch.uint8)
    with host_values():
        real = RealData(real_images, real_labels, spec.num_classes)
    # Seeded like a run: per-class algorithms then go class group by class group (`stored_together`).
    context = StepContext(real=real, dsa=DSA(), seed=0,
                          rows=None if spec.world_size == 1 else slice(0, spec.images), total_images=n)
    params = [synthetic.Z, synthetic.c] + list(algorithm.parameters())
    optimizer = torch.optim.SGD(params, lr=1.0, momentum=0.5)
    for p in params:  # steady state: momentum buffers exist before the iteration
        optimizer.state[p]["momentum_buffer"] = torch.zeros_like(p)
    weights = list(prior.parameters()) + list(prior.buffers())
    resident = weights + params + [optimizer.state[p]["momentum_buffer"] for p in params]
    if spec.algorithm == "mtt":
        resident += [t.epochs for t in algorithm.trajectories]
    return generator, synthetic, algorithm, context, optimizer, resident, weights


@functools.lru_cache(maxsize=256)
def simulate(spec: IterationSpec) -> Measurement:
    """Walk one iteration of `spec` for real (fake tensors): peak, per-phase peaks, FLOPs.

    Memoised in the process (specs are frozen, and the extrapolation points of different T
    share them) and on disk (`cache_path`).
    """
    if spec.dtype not in DTYPES:
        raise LD3MError(f"dtype must be one of {', '.join(DTYPES)}, got {spec.dtype!r}")
    if not spec.store_steps and spec.sac_min_flops is not None:
        return simulate(replace(spec, sac_min_flops=None))  # no stored step: nothing to keep selectively
    path = cache_path(spec)
    if path is not None:
        cached = _read_cached(path)
        if cached is not None:
            return cached
    result = _walk(spec)
    if path is not None:
        _write_cached(path, spec, result)
    return result


def _walk(spec: IterationSpec) -> Measurement:
    from torch._subclasses.fake_tensor import FakeTensorMode

    from ..distill.iteration import distill_iteration

    with FakeTensorMode(allow_non_fake_inputs=True):
        generator, synthetic, algorithm, context, optimizer, resident, weights = _build(spec)
        noise = generator.draw_noise(spec.images, torch.Generator().manual_seed(2))

        def iteration(phase):
            with torch.autocast("cpu", dtype=DTYPES[spec.dtype], enabled=spec.dtype != "fp32"):
                distill_iteration(generator, synthetic, algorithm, context, optimizer, noise, phase=phase)

        result = measure(iteration, existing=tuple(resident) + (noise.start,), with_phases=True)
    result.weights_bytes = sum(w.untyped_storage().nbytes() for w in weights)
    return result


# Sources that do not take part in a walk: a change there keeps the cache (the search in
# planner/plan.py chooses among walks; it does not run during one).
_NOT_WALKED = ("cli/", "bench.py", "__main__.py", "planner/plan.py")


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """ld3m_fast, torch and diffusers versions and a hash of the package's walked sources.

    Computed once per process, so a search keeps one key while files change under it."""
    import diffusers

    from .. import __version__

    package = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256(f"{__version__} {torch.__version__} {diffusers.__version__}".encode())
    for source in sorted(package.rglob("*.py")):
        name = source.relative_to(package).as_posix()
        if not name.startswith(_NOT_WALKED):
            digest.update(name.encode() + b"\0" + source.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


@functools.lru_cache(maxsize=16)
def prior_fingerprint(prior: str) -> str:
    """A named prior is its name (its config is in the sources); a folder, its configuration
    files (names and contents; weights are not read, as planning does not read them)."""
    from .priors import FULL_SIZE_PRIORS

    if prior in FULL_SIZE_PRIORS or not Path(prior).is_dir():
        return prior
    root = Path(prior)
    digest = hashlib.sha256()
    try:
        for config in sorted(root.rglob("*")):
            if config.is_file() and config.suffix in (".json", ".yaml", ".yml", ".toml", ".txt"):
                digest.update(config.relative_to(root).as_posix().encode() + b"\0" + config.read_bytes() + b"\0")
    except OSError:
        return f"unreadable folder {root.resolve()}"  # loading it says what is wrong
    return "folder:" + digest.hexdigest()[:16]


def cache_dir() -> Path | None:
    if os.environ.get("LD3M_FAST_PLANNER_CACHE", "1").strip().lower() in ("0", "off", "no", "false"):
        return None
    from .._files import user_cache_dir

    return user_cache_dir("planner")


def cache_key(spec: IterationSpec) -> dict:
    return {"spec": {**spec.describe(), "prior": prior_fingerprint(spec.prior)}, "code": code_version()}


def cache_path(spec: IterationSpec) -> Path | None:
    """Where the walk of `spec` is kept, or None with the cache turned off."""
    root = cache_dir()
    if root is None:
        return None
    key = json.dumps(cache_key(spec), sort_keys=True)
    return root / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.json"


def _read_cached(path: Path) -> Measurement | None:
    try:
        data = json.loads(path.read_text())
        result = Measurement(data["peak_bytes"], data["end_bytes"], data["flops"], data["flops_by_op"],
                             data["phase_peaks"])
        result.weights_bytes = data["weights_bytes"]
        return result
    except (OSError, ValueError, KeyError, TypeError):
        return None  # absent or unreadable: walk again (and overwrite)


def _write_cached(path: Path, spec: IterationSpec, result: Measurement) -> None:
    from .._files import write_json_atomic

    data = {"key": cache_key(spec), "peak_bytes": result.peak_bytes, "end_bytes": result.end_bytes,
            "flops": result.flops, "flops_by_op": result.flops_by_op, "phase_peaks": result.phase_peaks,
            "weights_bytes": result.weights_bytes}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, data)
    except OSError:
        pass  # a read-only cache only costs the next search its time


def image_unit(spec: IterationSpec) -> int:
    """Classes per unit: whole classes that also fill whole generator chunks.

    Without chunking the generator takes all images at once, which scales with the
    image count like any per-class state: one class is a unit.
    """
    if spec.chunk is None:
        return 1
    return max(1, math.lcm(spec.chunk, spec.ipc) // spec.ipc)


def stored_together(spec: IterationSpec, chunk: int | None = None) -> int:
    """Images whose stored steps' state is live at once (at `chunk`, default the spec's): one
    class group (whole classes filling whole chunks, `distill.iteration.render_groups`) for a
    per-class algorithm, every image this rank renders otherwise."""
    from ..distill.algorithms import DC, DM, MTT

    chunk = spec.chunk if chunk is None else chunk
    per_class = {a.name: a.per_class for a in (DC, DM, MTT)}.get(spec.algorithm, False)
    if chunk is None or not per_class:
        return spec.images
    return min(spec.images, math.lcm(chunk, spec.ipc))


def _bilinear(values: dict, t: float, g: float) -> float:
    """Evaluate the bilinear function through (t, g) in {t1, t2} x {g1, g2}."""
    (t1, g1), (t2, g2) = min(values), max(values)
    f11, f12, f21, f22 = values[(t1, g1)], values[(t1, g2)], values[(t2, g1)], values[(t2, g2)]
    u = (t - t1) / (t2 - t1)
    v = (g - g1) / (g2 - g1)
    return (f11 * (1 - u) * (1 - v) + f21 * u * (1 - v) + f12 * (1 - u) * v + f22 * u * v)


def estimate(spec: IterationSpec, *, direct: bool = False) -> Estimate:
    """Peak memory and FLOPs of one iteration; `direct=True` walks the full iteration."""
    if not 0 <= spec.store_steps <= spec.steps:
        raise LD3MError(f"store_steps must be in 0..{spec.steps}, got {spec.store_steps}")
    if spec.world_size < 1:
        raise LD3MError(f"the world size must be >= 1, got {spec.world_size}")
    if spec.world_size > 1 and not direct:
        return _one_rank(spec)
    if 0 < spec.store_steps < spec.steps and not direct:
        return _between_stored(spec)
    unit = image_unit(spec)
    if direct or (spec.steps <= 2 and spec.num_classes <= 2 * unit):
        m = simulate(spec)
        return Estimate(spec, m.peak_bytes, m.flops, m.phase_peaks, m.weights_bytes, "simulated")
    if spec.num_classes % unit:
        raise LD3MError(f"{spec.num_classes} classes are not a whole number of {unit}-class units "
                        f"(chunk {spec.chunk}, ipc {spec.ipc}); choose a chunk that divides the images")
    points = {}
    weights = 0
    for t in (1, 2):
        for g in (1, 2):
            # store_steps is 0 or T here: all steps stored stays all steps at T = t.
            m = simulate(replace(spec, steps=t, num_classes=g * unit,
                                 store_steps=t if spec.store_steps else 0))
            weights = m.weights_bytes
            points[(t, g)] = m
    target_g = spec.num_classes / unit
    phase_peaks = {}
    for name in PHASES:
        values = {k: float(m.phase_peaks.get(name, 0)) for k, m in points.items()}
        phase_peaks[name] = _bilinear(values, spec.steps, target_g)
    flops = _bilinear({k: float(m.flops) for k, m in points.items()}, spec.steps, target_g)
    peak = max(phase_peaks.values())
    return Estimate(spec, peak, flops, phase_peaks, weights, "extrapolated (T in 1,2; 2 image counts)")


def _one_rank(spec: IterationSpec) -> Estimate:
    """One rank of `spec.world_size`: its classes as one process, plus the other ranks' rows of
    Z and c (parameter + momentum in every phase, + gradient in the backward phase)."""
    local = estimate(replace(spec, num_classes=spec.local_classes, world_size=1))
    others = (spec.total_images - spec.images) * row_bytes(spec.prior, spec.res)
    phase_peaks = {name: local.phase_peaks.get(name, 0.0) + 2 * others + (others if name == "backward" else 0)
                   for name in PHASES}
    return Estimate(spec, max(phase_peaks.values()), local.flops, phase_peaks, local.weights_bytes,
                    f"{local.method}; one rank of {spec.world_size} (the other ranks' rows of Z, c added)")


@functools.lru_cache(maxsize=64)
def row_bytes(prior: str, res: int) -> int:
    """Bytes of one image's row of Z and c (fp32, as a run keeps them)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from ..generator import render_size

    with FakeTensorMode(allow_non_fake_inputs=True):
        planning = build_planning_prior(prior)
        latent = planning.latent_shape(render_size(planning, res))
        return 4 * (math.prod(latent) + planning.embedding_dim)


def _between_stored(spec: IterationSpec) -> Estimate:
    """0 < k < T stored steps: linear between k = 0 and k = T (FLOPs exact, peaks an upper bound)."""
    low = estimate(replace(spec, store_steps=0))
    high = estimate(replace(spec, store_steps=spec.steps))
    f = spec.store_steps / spec.steps
    mix = lambda a, b: (1 - f) * a + f * b  # noqa: E731
    phase_peaks = {name: mix(low.phase_peaks.get(name, 0.0), high.phase_peaks.get(name, 0.0))
                   for name in PHASES}
    return Estimate(spec, max(phase_peaks.values()), mix(low.flops, high.flops), phase_peaks,
                    high.weights_bytes, f"{high.method}; stored steps interpolated between 0 and T")

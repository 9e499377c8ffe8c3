"""Simulate one distillation iteration of the real code path under fake tensors.

A `Walk` is one iteration to simulate: a run's config (its walked settings,
`DistillConfig.walked_settings`) at a size (classes, processes). `simulate(walk)` assembles
that iteration exactly as the run does (`ld3m_fast.distill.assemble.assemble_iteration`) over
the prior's architecture (full size, no weights), then runs
`ld3m_fast.distill.iteration.distill_iteration` under `FakeTensorMode` with the
live-storage tracker and the FLOP counter. Nothing is computed, but every tensor the real
iteration would allocate is allocated (as metadata) and freed when the real one would be.
Repeated calls of the denoiser and the decoder inside a walk are replayed from a recording
of the first (`ld3m_fast.distill.planner.replay`): the same allocations, frees and FLOPs,
without dispatching every operator again.

A T=20, 100-image iteration would still take minutes to walk whole, so `estimate(walk)` walks
the real code at T in {1, 2} steps and at one and two "units" of images (a unit is the smallest
set of whole classes that also fills whole generator chunks), and extrapolates each phase's
peak (render / distill / backward) and the FLOPs bilinearly in (T, images). The model is exact
when each phase's peak is bilinear in T and the image count, which holds for this pipeline
(per-step latents, stored steps and per-image state grow linearly, working memory is per
chunk, per class or per micro-batch); `tests/test_planner.py` checks the extrapolation against
a direct simulation.

Several processes (`world_size` > 1, `ld3m_fast.distributed`): each rank renders and
differentiates its own classes but holds the whole Z, c, their momentum and (at the end of
backward) their gradient. The estimate is one rank's: the busiest rank's classes simulated
(and extrapolated in classes) as above, plus the other ranks' rows of Z and c with their
momentum in every phase and their gradient in the backward phase, an upper bound (the
gradient is all-reduced in place; the backend's own buffers are not counted).
`estimate(walk, direct=True)` walks the rank's real iteration instead (tested against it).

Every walk is also kept on disk (`LD3M_FAST_CACHE`, default ~/.cache/ld3m_fast, under
planner/; `LD3M_FAST_PLANNER_CACHE=0` turns it off). A walk's peak and FLOPs do not depend
on the memory budget, so one search serves every budget, and a later `plan` or run reuses
the walks of an earlier one. The key is the walk (its settings, classes and processes), the
prior's architecture (a named prior's name, a folder's configuration files), and the code that
was walked: the versions of ld3m_fast, torch and diffusers and a hash of the walked sources
(a change to any of them misses).

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
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from ...errors import LD3MError
from ..config import DistillConfig
from .measure import Measurement, PeakAndFlops, measure
from .priors import build_planning_prior

PHASES = ("render", "distill", "backward")


@dataclass(frozen=True)
class Walk:
    """One iteration to simulate: a run's walked settings at a size.

    settings: (name, value) pairs of `DistillConfig.walked_settings()`, sorted, with the prior
    and res resolved and concrete chunk knobs (no 'auto'); num_classes: the run's classes;
    world_size: its processes (the walk is the busiest rank's, rank 0).
    """

    settings: tuple
    num_classes: int
    world_size: int = 1

    @classmethod
    def of(cls, config: DistillConfig, num_classes: int, world_size: int = 1) -> "Walk":
        settings = config.walked_settings()
        if settings["prior"] is None or settings["res"] is None or settings["chunk"] == "auto":
            raise ValueError("a walk needs the prior, the resolution and concrete chunk knobs")
        return cls(tuple(sorted(settings.items())), int(num_classes), int(world_size))

    @functools.cached_property
    def config(self) -> DistillConfig:
        """The run's config as far as the walk knows it (the settings it does not walk at their defaults)."""
        return DistillConfig(**dict(self.settings))

    def at(self, *, num_classes: int | None = None, world_size: int | None = None, **settings) -> "Walk":
        """This walk with other settings or another size."""
        values = {**dict(self.settings), **settings}
        unknown = set(values) - set(dict(self.settings))
        if unknown:
            raise ValueError(f"not walked settings: {sorted(unknown)}")
        return Walk(tuple(sorted(values.items())),
                    self.num_classes if num_classes is None else int(num_classes),
                    self.world_size if world_size is None else int(world_size))

    @property
    def local_classes(self) -> int:
        """Classes of the busiest rank (all of them in one process)."""
        from ...distributed import largest_share

        return largest_share(self.num_classes, self.world_size)

    @property
    def images(self) -> int:
        """Images one rank renders (all of them in one process)."""
        return self.config.ipc * self.local_classes

    @property
    def total_images(self) -> int:
        return self.config.ipc * self.num_classes

    def describe(self) -> dict:
        return {**dict(self.settings), "num_classes": self.num_classes, "world_size": self.world_size}

    @classmethod
    def from_description(cls, described: dict) -> "Walk":
        """The walk `describe()` gave (JSON round trip)."""
        settings = {k: v for k, v in described.items() if k not in ("num_classes", "world_size")}
        return cls(tuple(sorted(settings.items())), int(described["num_classes"]), int(described["world_size"]))


@dataclass
class Estimate(PeakAndFlops):
    """Peak bytes and FLOPs of one iteration (extrapolated or simulated directly)."""

    walk: Walk
    peak_bytes: float
    flops: float
    phase_peaks: dict
    weights_bytes: int
    method: str


def _fake_trajectories(network, config: DistillConfig):
    """Expert trajectories of the student's shape with the epochs MTT reads (`load_buffer` keeps
    those; the planner's are zeros under fake tensors)."""
    from ..buffers import ExpertTrajectory

    module = network.build()
    names = [n for n, _ in module.named_parameters()]
    shapes = [tuple(p.shape) for _, p in module.named_parameters()]
    size = sum(p.numel() for p in module.parameters())
    epochs = config.max_start_epoch + config.expert_epochs
    return [ExpertTrajectory(torch.zeros(epochs, size), names, shapes, {}, source="planner")]


@dataclass
class Walked:
    """Everything one walked iteration touches: the assembled iteration, the synthetic set, the
    step context, the optimiser (in steady state: momentum buffers exist), this iteration's noise,
    and what is live before it starts (`resident`; `weights` of it are the prior's)."""

    iteration: object
    synthetic: object
    context: object
    optimizer: object
    noise: object
    resident: list
    weights: list

    def run(self, phase=None) -> None:
        """One iteration (`ld3m_fast.distill.iteration.distill_iteration`), as a run steps it."""
        from ..iteration import distill_iteration

        options = {} if phase is None else {"phase": phase}
        with self.iteration.autocast(self.context.device.type):
            distill_iteration(self.iteration.generator, self.synthetic, self.iteration.algorithm, self.context,
                              self.optimizer, self.noise, **options)


def build_walked(walk: Walk, *, prior=None, device="cpu", generator: torch.Generator | None = None) -> Walked:
    """The iteration of `walk`, assembled as the run assembles it (`assemble_iteration`).

    Under the planner: inside a FakeTensorMode, over the prior's architecture, with zeros for the
    data. For a measurement: `prior` a real (random-weight) prior on `device`, and `generator`
    drawing random latents, embeddings and real images (values do not change what is allocated)."""
    from ..._host import host_values
    from ...synthetic import SyntheticSet
    from ..algorithms import RealData
    from ..assemble import assemble_iteration, build_context, build_network_spec, build_optimizer

    config = walk.config
    prior = build_planning_prior(config.prior) if prior is None else prior
    trajectories = None
    if config.algorithm == "mtt":
        trajectories = _fake_trajectories(build_network_spec(config, config.res, walk.num_classes), config)
    iteration = assemble_iteration(config, prior, num_classes=walk.num_classes, trajectories=trajectories,
                                   res=config.res)
    if torch.device(device).type != "cpu":  # (a module's .to cannot swap fake parameters)
        iteration.algorithm.to(device)
    n = walk.total_images  # every rank holds the whole set; it renders `walk.images` of it
    with host_values():
        labels = torch.arange(walk.num_classes).repeat_interleave(config.ipc)
        real_labels = torch.arange(walk.num_classes).repeat_interleave(config.batch_real)
    latent_shape = iteration.generator.latent_shape
    if generator is None:
        Z, c = torch.zeros(n, *latent_shape), torch.zeros(n, prior.embedding_dim)
        real_images = torch.zeros(len(real_labels), 3, iteration.res, iteration.res, dtype=torch.uint8)
    else:
        Z, c = torch.randn(n, *latent_shape, generator=generator), torch.randn(n, prior.embedding_dim, generator=generator)
        real_images = torch.randint(0, 256, (len(real_labels), 3, iteration.res, iteration.res), generator=generator,
                                    dtype=torch.uint8)
    if torch.device(device) != Z.device:
        Z, c = Z.to(device), c.to(device)
    synthetic = SyntheticSet(Z, c, torch.zeros(n, dtype=torch.long, device=Z.device), list(range(walk.num_classes)))
    synthetic.labels = labels  # real: class bookkeeping reads it on the host
    with host_values():
        real = RealData(real_images, real_labels, walk.num_classes)  # uint8 on the host, as a run keeps it
    # Seeded like a run: per-class algorithms then go class group by class group (`stored_together`).
    context = build_context(iteration, real, seed=0, total_images=n, device=device, iteration_number=1,
                            rows=None if walk.world_size == 1 else slice(0, walk.images))
    optimizer = build_optimizer(config, synthetic, iteration.algorithm, lr_latent=1.0, lr_class=1.0)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if config.momentum:  # steady state: momentum buffers exist before the iteration
        for p in params:
            optimizer.state[p]["momentum_buffer"] = torch.zeros_like(p)
    noise = iteration.generator.draw_noise(walk.images, torch.Generator().manual_seed(2), device="cpu").to(device)
    weights = list(prior.parameters()) + list(prior.buffers())
    resident = weights + params + [optimizer.state[p]["momentum_buffer"] for p in params if optimizer.state[p]]
    resident += [noise.start] + ([] if noise.steps is None else [noise.steps])
    if trajectories:
        resident += [t.epochs for t in trajectories]
    return Walked(iteration, synthetic, context, optimizer, noise, resident, weights)


def walked_description(walk: Walk) -> dict:
    """What `walk` walks (`ld3m_fast.distill.assemble.describe_step`), without walking it."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from ..assemble import describe_step

    with FakeTensorMode(allow_non_fake_inputs=True):
        built = build_walked(walk)
        return describe_step(built.iteration, built.context, built.synthetic.labels)


_WALKED: dict = {}  # walks simulated (or read from disk) in this process


def _normalised(walk: Walk) -> Walk:
    """No stored step: nothing is kept selectively, so the level does not matter."""
    if not walk.config.store_steps and walk.config.sac_min_flops is not None:
        return walk.at(sac_min_flops=None)
    return walk


def simulate(walk: Walk) -> Measurement:
    """Walk one iteration of `walk` for real (fake tensors): peak, per-phase peaks, FLOPs.

    Kept in the process (walks are frozen, and the extrapolation points of different T share
    them) and on disk (`cache_path`).
    """
    walk = _normalised(walk)
    if walk in _WALKED:
        return _WALKED[walk]
    path = cache_path(walk)
    result = None if path is None else _read_cached(path)
    if result is None:
        with _progress.walking():
            result = _walk(walk)
        if path is not None:
            _write_cached(path, walk, result)
    _WALKED[walk] = result
    return result


def forget_walks() -> None:
    """Drop the walks kept in this process (the disk cache stays): a new process, for tests."""
    _WALKED.clear()


def uncached(walks) -> list[Walk]:
    """The walks of `walks` kept neither in this process nor on disk: what simulating them will walk."""
    missing = []
    for walk in dict.fromkeys(_normalised(w) for w in walks):
        path = cache_path(walk)
        if walk not in _WALKED and (path is None or not path.is_file()):
            missing.append(walk)
    return missing


def _walk(walk: Walk) -> Measurement:
    from torch._subclasses.fake_tensor import FakeTensorMode

    from .replay import replaying

    with FakeTensorMode(allow_non_fake_inputs=True):
        built = build_walked(walk)
        iteration = built.iteration

        def run(phase):
            with replaying(iteration.generator, prior_fingerprint(walk.config.prior), iteration.network):
                built.run(phase)

        result = measure(run, existing=tuple(built.resident), with_phases=True)
    result.weights_bytes = sum(w.untyped_storage().nbytes() for w in built.weights)
    return result


# --------------------------------------------------------------------------- progress


class _Progress:
    """A progress bar over the walks a search still has to make (`planned`), with an estimate."""

    def __init__(self):
        self.bar = None

    def expect(self, count: int, *, enabled: bool = True) -> None:
        """`count` more walks are coming (a search stage announces its walks)."""
        if count <= 0 or not enabled:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=0, desc="planner walks", unit="walk", dynamic_ncols=True, leave=False)
        self.bar.total += count
        self.bar.refresh()

    @contextmanager
    def walking(self):
        try:
            yield
        finally:
            if self.bar is not None:
                self.bar.update(1)
                if self.bar.n > self.bar.total:
                    self.bar.total = self.bar.n

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


_progress = _Progress()


# --------------------------------------------------------------------------- the disk cache

# Sources that take no part in a walk: a change there keeps the cache.
_NOT_WALKED = ("cli/", "data/", "bench.py", "__main__.py", "convert.py", "presets.py", "_threads.py",
               "_memory.py", "distill/planner/plan.py", "distill/planner/memory.py", "distill/run.py",
               "distill/setup.py", "distill/runfolder.py", "distill/export.py", "distill/evaluation.py")


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """ld3m_fast, torch and diffusers versions and a hash of the package's walked sources.

    Computed once per process, so a search keeps one key while files change under it."""
    import diffusers

    from ... import __version__

    package = Path(__file__).resolve().parents[2]
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
    from ...errors import LD3MError
    from ...priors.pipeline import config_files
    from .priors import FULL_SIZE_PRIORS

    if prior in FULL_SIZE_PRIORS or not Path(prior).exists():
        return prior
    digest = hashlib.sha256()
    try:  # a prior folder, a diffusers pipeline folder or a prior file (with its pipeline)
        for config in config_files(prior):
            digest.update(config.as_posix().encode() + b"\0" + config.read_bytes() + b"\0")
    except (OSError, LD3MError):
        return f"unreadable prior {Path(prior).resolve()}"  # loading it says what is wrong
    return "prior:" + digest.hexdigest()[:16]


def cache_dir() -> Path | None:
    if os.environ.get("LD3M_FAST_PLANNER_CACHE", "1").strip().lower() in ("0", "off", "no", "false"):
        return None
    from ..._files import user_cache_dir

    return user_cache_dir("planner")


def cache_key(walk: Walk) -> dict:
    described = walk.describe()
    return {"walk": {**described, "prior": prior_fingerprint(described["prior"])}, "code": code_version()}


def cache_path(walk: Walk) -> Path | None:
    """Where the walk is kept, or None with the cache turned off."""
    root = cache_dir()
    if root is None:
        return None
    key = json.dumps(cache_key(walk), sort_keys=True)
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


def _write_cached(path: Path, walk: Walk, result: Measurement) -> None:
    from ..._files import write_json_atomic

    data = {"key": cache_key(walk), "peak_bytes": result.peak_bytes, "end_bytes": result.end_bytes,
            "flops": result.flops, "flops_by_op": result.flops_by_op, "phase_peaks": result.phase_peaks,
            "weights_bytes": result.weights_bytes}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, data)
    except OSError:
        pass  # a read-only cache only costs the next search its time


# --------------------------------------------------------------------------- extrapolation


def image_unit(walk: Walk) -> int:
    """Classes per unit: whole classes that also fill whole generator chunks.

    Without chunking the generator takes all images at once, which scales with the
    image count like any per-class state: one class is a unit.
    """
    chunk, ipc = walk.config.chunk, walk.config.ipc
    if chunk is None:
        return 1
    return max(1, math.lcm(chunk, ipc) // ipc)


def stored_together(walk: Walk, chunk: int | None = None) -> int:
    """Images whose stored steps' state is live at once (at `chunk`, default the walk's): one
    class group (whole classes filling whole chunks, `distill.iteration.render_groups`) for a
    per-class algorithm, every image this rank renders otherwise."""
    from ..algorithms import DC, DM, MTT

    config = walk.config
    chunk = config.chunk if chunk is None else chunk
    per_class = {a.name: a.per_class for a in (DC, DM, MTT)}.get(config.algorithm, False)
    if chunk is None or not per_class:
        return walk.images
    return min(walk.images, math.lcm(chunk, config.ipc))


def _bilinear(values: dict, t: float, g: float) -> float:
    """Evaluate the bilinear function through (t, g) in {t1, t2} x {g1, g2}."""
    (t1, g1), (t2, g2) = min(values), max(values)
    f11, f12, f21, f22 = values[(t1, g1)], values[(t1, g2)], values[(t2, g1)], values[(t2, g2)]
    u = (t - t1) / (t2 - t1)
    v = (g - g1) / (g2 - g1)
    return (f11 * (1 - u) * (1 - v) + f21 * u * (1 - v) + f12 * (1 - u) * v + f22 * u * v)


def extrapolation_points(walk: Walk) -> list[Walk]:
    """The walks `estimate(walk)` simulates (before interpolating stored steps or adding ranks)."""
    config = walk.config
    if walk.world_size > 1:
        return extrapolation_points(walk.at(num_classes=walk.local_classes, world_size=1))
    store = config.store_steps or 0
    if 0 < store < config.steps:
        return extrapolation_points(walk.at(store_steps=0)) + extrapolation_points(walk.at(store_steps=config.steps))
    unit = image_unit(walk)
    if config.steps <= 2 and walk.num_classes <= 2 * unit:
        return [walk]
    # store_steps is 0 or T here: all steps stored stays all steps at T = t.
    return [walk.at(steps=t, num_classes=g * unit, store_steps=t if store else 0) for t in (1, 2) for g in (1, 2)]


def estimate(walk: Walk, *, direct: bool = False) -> Estimate:
    """Peak memory and FLOPs of one iteration; `direct=True` walks the full iteration."""
    config = walk.config
    store = config.store_steps or 0
    if not 0 <= store <= config.steps:
        raise LD3MError(f"store_steps must be in 0..{config.steps}, got {store}")
    if walk.world_size < 1:
        raise LD3MError(f"the world size must be >= 1, got {walk.world_size}")
    if walk.world_size > 1 and not direct:
        return _one_rank(walk)
    if 0 < store < config.steps and not direct:
        return _between_stored(walk)
    unit = image_unit(walk)
    if direct or (config.steps <= 2 and walk.num_classes <= 2 * unit):
        m = simulate(walk)
        return Estimate(walk, m.peak_bytes, m.flops, m.phase_peaks, m.weights_bytes, "simulated")
    if walk.num_classes % unit:
        raise LD3MError(f"{walk.num_classes} classes are not a whole number of {unit}-class units "
                        f"(chunk {config.chunk}, ipc {config.ipc}); choose a chunk that divides the images")
    points = {}
    weights = 0
    for point in extrapolation_points(walk):
        m = simulate(point)
        weights = m.weights_bytes
        points[(point.config.steps, point.num_classes // unit)] = m
    target_g = walk.num_classes / unit
    phase_peaks = {}
    for name in PHASES:
        values = {k: float(m.phase_peaks.get(name, 0)) for k, m in points.items()}
        phase_peaks[name] = _bilinear(values, config.steps, target_g)
    flops = _bilinear({k: float(m.flops) for k, m in points.items()}, config.steps, target_g)
    peak = max(phase_peaks.values())
    return Estimate(walk, peak, flops, phase_peaks, weights, "extrapolated (T in 1,2; 2 image counts)")


def _one_rank(walk: Walk) -> Estimate:
    """One rank of `walk.world_size`: its classes as one process, plus the other ranks' rows of
    Z and c (parameter + momentum in every phase, + gradient in the backward phase)."""
    local = estimate(walk.at(num_classes=walk.local_classes, world_size=1))
    config = walk.config
    row = row_bytes(config.prior, config.res, released=config.released_compat)
    others = (walk.total_images - walk.images) * row
    copies = 2 if config.momentum else 1
    phase_peaks = {name: local.phase_peaks.get(name, 0.0) + copies * others + (others if name == "backward" else 0)
                   for name in PHASES}
    return Estimate(walk, max(phase_peaks.values()), local.flops, phase_peaks, local.weights_bytes,
                    f"{local.method}; one rank of {walk.world_size} (the other ranks' rows of Z, c added)")


@functools.lru_cache(maxsize=64)
def row_bytes(prior: str, res: int, *, released: bool = False) -> int:
    """Bytes of one image's row of Z and c (fp32, as a run keeps them); `released`: the size the
    released pipeline renders at (`render_size`), as `--released-compat` does."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from ...generator import render_size

    with FakeTensorMode(allow_non_fake_inputs=True):
        planning = build_planning_prior(prior)
        latent = planning.latent_shape(render_size(planning, res, released=released))
        return 4 * (math.prod(latent) + planning.embedding_dim)


def _between_stored(walk: Walk) -> Estimate:
    """0 < k < T stored steps: linear between k = 0 and k = T (FLOPs exact, peaks an upper bound)."""
    config = walk.config
    low = estimate(walk.at(store_steps=0))
    high = estimate(walk.at(store_steps=config.steps))
    f = config.store_steps / config.steps
    mix = lambda a, b: (1 - f) * a + f * b  # noqa: E731
    phase_peaks = {name: mix(low.phase_peaks.get(name, 0.0), high.phase_peaks.get(name, 0.0))
                   for name in PHASES}
    return Estimate(walk, max(phase_peaks.values()), mix(low.flops, high.flops), phase_peaks,
                    high.weights_bytes, f"{high.method}; stored steps interpolated between 0 and T")


__all__ = ["Estimate", "PHASES", "Walk", "Walked", "build_walked", "cache_path", "code_version", "estimate",
           "extrapolation_points", "forget_walks", "image_unit", "row_bytes", "simulate", "stored_together",
           "uncached", "walked_description"]

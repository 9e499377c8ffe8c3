"""Everything a run needs, built and validated before anything is written.

`build_setup(config)` loads the prior, the data and the expert buffer and builds the
generator, the synthetic set and the algorithm. It is pure (it writes nothing but
the data module's decode cache), so every bad input fails before a run folder exists.

The iteration itself (generator, network, algorithm, augmentation) is assembled from the
config in `ld3m_fast.distill.assemble`, the one place every consumer uses; with --chunk auto,
the planner (`ld3m_fast.distill.planner`) first fills the knobs the config leaves open.

Resolution: up to the prior's native size the chain renders at `res` itself (latents
of side res / latent factor: cin256-v2 at 128² uses 3×32×32, as in the paper); above
it, the prior renders natively and an antialiased, differentiable bilinear resize
inside the generator reaches `res` (`ld3m_fast.generator.render_size`). With
`--released-compat` the chain renders at `res` at every size, as the released code does.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

import torch

from .. import distributed
from ..errors import LD3MError
from ..generator import released_timesteps
from .algorithms import RealData, stream_generator
from .assemble import (Iteration, assemble_iteration, buffer_expectation, build_network_spec,
                       resolve_resolution)
from .config import DistillConfig

logger = logging.getLogger(__name__)


@dataclass
class Setup:
    """Everything a run needs, built and validated before anything is written.

    `iteration` is the assembled iteration (`ld3m_fast.distill.assemble`); `plan` the knobs it
    runs with when the planner chose them (--chunk auto), with the planner's figures."""

    config: DistillConfig
    prior: object
    iteration: Iteration
    synthetic: object
    real: RealData
    class_names: list[str]
    device: torch.device
    test_set: object | None = None  # the real test split, when inline evaluation is on
    plan: dict = field(default_factory=dict)

    @property
    def generator(self):
        return self.iteration.generator

    @property
    def algorithm(self):
        return self.iteration.algorithm

    @algorithm.setter
    def algorithm(self, algorithm) -> None:
        self.iteration.algorithm = algorithm

    @property
    def dsa(self):
        return self.iteration.dsa

    @property
    def res(self) -> int:
        return self.iteration.res


def resolve_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise LD3MError(f"unknown --device {name!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LD3MError(f"--device {name} asked for but no CUDA device is available; use --device cpu")
    return device


def prior_class_rows(prior, subset: str | None, num_classes: int) -> list[int]:
    """The prior's class-table row for each dataset label."""
    if subset is not None and prior.num_classes == 1000:
        from ..data.subsets import resolve_subset

        return list(resolve_subset(subset).imagenet_indices)
    if num_classes > prior.num_classes:
        raise LD3MError(f"the data has {num_classes} classes but the prior only {prior.num_classes}; "
                        "use a prior trained on these classes")
    return list(range(num_classes))


def run_budget(config: DistillConfig, device: torch.device):
    """The memory a plan of this run may fill (`planner.memory.memory_budget`)."""
    from .planner.memory import memory_budget

    return memory_budget(config.memory_budget, config.memory_reserve, device)


def planned_config(config: DistillConfig, num_classes: int, device: torch.device, *,
                   budget=None) -> tuple[DistillConfig, dict]:
    """The config the iteration is assembled from: with --chunk auto, the planner's knobs for the
    memory budget (one rank's share of the classes); else the config itself. Returns (config, the
    plan: the knobs, the planned peak, the budget) ({} without --chunk auto)."""
    if config.chunk != "auto":
        return config, {}
    from .planner.memory import format_bytes
    from .planner.plan import choose_knobs, knob_flags

    budget = budget or run_budget(config, device)
    knobs, best = choose_knobs(config, num_classes, budget, world_size=distributed.current().world_size,
                               progress=config.progress and distributed.current().is_main)
    logger.info(f"--chunk auto: {knob_flags(best.walk)} ({best.mode}; planned peak "
                f"{format_bytes(best.estimate.peak_bytes)} of {budget.describe()}, "
                f"{best.estimate.tflops:.1f} TFLOP per iteration)")
    chosen = replace(config, **knobs)
    return chosen, {"knobs": knobs, "mode": best.mode, "planned_peak_bytes": int(best.estimate.peak_bytes),
                    "tflops": best.estimate.tflops, "budget_bytes": budget.budget, "usable_bytes": budget.usable}


def use_memory_efficient_attention(prior, device: torch.device) -> str:
    """xformers attention on CUDA when it is installed; PyTorch SDPA otherwise (diffusers' default)."""
    if device.type != "cuda":
        return "sdpa"
    try:
        import xformers.ops  # noqa: F401
    except ImportError:
        return "sdpa"
    for model in (prior.denoiser.model, prior.autoencoder.model):
        if hasattr(model, "enable_xformers_memory_efficient_attention"):
            model.enable_xformers_memory_efficient_attention()
    logger.info("attention: xformers (memory-efficient) on CUDA")
    return "xformers"


def compile_prior(prior, backend: str) -> None:
    """torch.compile the denoiser and the decoder in place (the encoder runs once, at init)."""
    prior.denoiser.model.compile(backend=backend)
    prior.autoencoder.model.decoder.compile(backend=backend)


def check_chain_steps(steps: int, train_timesteps: int) -> None:
    """T below the prior's training timesteps: the chain's timesteps 1 + k * (N // T) index the
    noise schedule of N entries (T >= N ran 1001 steps all at t = 1, or indexed past its end)."""
    if steps >= train_timesteps:
        raise LD3MError(f"--steps {steps} is not below the prior's {train_timesteps} training timesteps (the "
                        f"chain's timesteps 1 + k * ({train_timesteps} // T) index its noise schedule); use "
                        f"--steps {train_timesteps - 1} or fewer")


def iteration_lower_bound(config: DistillConfig, prior, res: int) -> dict[str, int]:
    """What one class's synthetic images certainly hold at once in an iteration, in bytes, by
    part: the chain's latents (every step's, for the recompute backward), the rendered images at
    `res` and their gradient, and the distillation ConvNet's first layer over one micro-batch
    (the convolution's output and the in-place ReLU's, kept for the backward, and the gradient
    that flows back through them: three full-size activations). The real batch, the denoiser's
    and the decoder's activations come on top: a lower bound, known before any data is read."""
    from ..choices import torch_dtype
    from ..generator import render_size

    ipc = config.ipc
    channels, side, _ = prior.latent_shape(render_size(prior, res, released=config.released_compat))
    element = torch.tensor([], dtype=torch_dtype(config.dtype)).element_size()
    micro = min(v for v in (config.micro_batch, config.batch_syn, ipc) if v)
    return {"latents": (config.steps + 1) * ipc * channels * side * side * 4,
            "images": 2 * ipc * 3 * res * res * 4,
            "network": 3 * micro * config.width * res * res * element}


def check_iteration_memory(config: DistillConfig, prior, res: int, budget) -> None:
    """Refuse, before any data is read or any folder made, a setting whose iteration cannot fit
    the memory budget (`run_budget`) by `iteration_lower_bound` alone (one line)."""
    from .planner.memory import format_bytes

    parts = iteration_lower_bound(config, prior, res)
    needed = sum(parts.values())
    if needed > budget.usable:
        images = f"{config.ipc} synthetic image{'s' if config.ipc > 1 else ''}"
        raise LD3MError(f"one class's {images} at {res}² cannot fit: they alone need at least {format_bytes(needed)} "
                        f"per iteration (the images and their gradient {format_bytes(parts['images'])}, the ConvNet's "
                        f"first layer (width {config.width}) through its backward {format_bytes(parts['network'])}, "
                        f"the chain's latents {format_bytes(parts['latents'])}), more than {budget.describe()}; "
                        "lower --res, --ipc or --width, set --micro-batch, or raise --memory-budget")


def load_trajectories(config: DistillConfig, res: int, num_classes: int):
    """MTT's expert trajectories, checked against the student the config builds (None otherwise)."""
    if config.algorithm != "mtt":
        return None
    from .buffers import load_buffer

    network = build_network_spec(config, res, num_classes)
    return load_buffer(config.buffer, expect=buffer_expectation(network))


def prepare_native_kernels() -> None:
    """Load (or build, once) the C++ CPU kernels now, so a first build happens here, said in
    one line, and not silently inside iteration 1."""
    from ..ops import _native

    _native.ensure_extension()


def build_setup(config: DistillConfig) -> Setup:
    """Load the prior, data and buffer and assemble the iteration and the synthetic set."""
    from ..data import load_dataset, require_per_class
    from ..priors import load_prior
    from ..prune import prune_for_run
    from ..synthetic import SyntheticSet

    config.validate()
    # Under torchrun each rank runs on its own device (cuda:LOCAL_RANK with NCCL).
    device = distributed.current().device(resolve_device(config.device))
    prior = load_prior(config.prior).to(device)  # a missing folder or a hub id: one line
    # The prior's limits, before the data load: T, a T the released sampler fails at, res, memory.
    check_chain_steps(config.steps, len(prior.alphas_cumprod))
    if config.released_compat:
        released_timesteps(len(prior.alphas_cumprod), config.steps)
    res = resolve_resolution(prior, config.res, released=config.released_compat)
    budget = run_budget(config, device)  # measured once, at start: the check and --chunk auto share it
    check_iteration_memory(config, prior, res, budget)
    comm = distributed.current()
    source = dict(split="train", subset=config.subset, res=res, cache_dir=config.cache_dir,
                  max_per_class=config.max_per_class)
    # Memory-mapped from the data cache: nothing is read until a row is sampled.
    data = load_dataset(config.data, **source, progress=config.progress and comm.is_main)
    data = prune_for_run(data, config)  # --prune-percent (100: unchanged); fills prune_scorer_hash
    require_per_class(data, config.ipc)
    rows = prior_class_rows(prior, config.subset, data.num_classes)
    trajectories = load_trajectories(config, res, data.num_classes)
    assembled, plan = planned_config(config, data.num_classes, device, budget=budget)
    iteration = assemble_iteration(assembled, prior, num_classes=data.num_classes, trajectories=trajectories,
                                   res=res)
    synthetic = SyntheticSet.from_real(prior, data.images, data.labels, config.ipc,
                                       stream_generator(config.seed, "init"), prior_classes=rows,
                                       image_size=iteration.render_size).to(device)
    use_memory_efficient_attention(prior, device)
    if config.compile:
        compile_prior(prior, config.compile_backend)
    iteration.algorithm.to(device)
    if device.type == "cpu":
        prepare_native_kernels()
    real = RealData.from_imageset(_own_classes(data, config, source, comm))
    test_set = load_inline_eval_data(config, res) if config.eval_every else None
    return Setup(config, prior, iteration, synthetic, real, list(data.class_names), device, test_set, plan)


def _own_classes(data, config: DistillConfig, source: dict, comm):
    """The real images this process samples from: under torchrun only its own classes are opened
    (`load_dataset(classes=...)`: every other class's rows are never mapped); the synthetic set's
    initialisation reads `ipc` images of every class from the whole set, so it does not depend on
    the number of processes. A pruned set is already the kept rows, in memory."""
    from ..data import load_dataset

    if comm.world_size == 1 or config.prune_percent < 100:
        return data
    return load_dataset(config.data, **source, classes=comm.class_share)


def load_inline_eval_data(config: DistillConfig, res: int):
    """The test split and a check of the architectures, now rather than at the first evaluation."""
    from ..data import load_dataset
    from ..networks import parse_arch

    for arch in config.eval_archs.split(","):
        parse_arch(arch.strip())
    return load_dataset(config.data, split="test", subset=config.subset, res=res,
                        cache_dir=config.cache_dir)


__all__ = ["Setup", "build_setup", "check_chain_steps", "check_iteration_memory", "iteration_lower_bound",
           "planned_config", "prior_class_rows", "resolve_device", "run_budget",
           "use_memory_efficient_attention"]

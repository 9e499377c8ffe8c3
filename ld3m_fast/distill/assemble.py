"""One distillation iteration assembled from a run's config: the one place that does it.

    iteration = assemble_iteration(config, prior, num_classes=10, trajectories=...)
    context   = build_context(iteration, real, seed=config.seed, device=..., comm=..., rows=...)
    optimizer = build_optimizer(config, synthetic, iteration.algorithm)
    with iteration.autocast(device.type):
        distill_iteration(iteration.generator, synthetic, iteration.algorithm, context, optimizer, noise)

Every consumer builds its iteration here: the run (`ld3m_fast.distill.setup.build_setup`),
the planner's walks under fake tensors (`ld3m_fast.distill.planner.simulate`), the GPU check
and the benchmarks. From the config come:
- the generator (`generator_options`): T, guidance, skip, eta, the gradient mode and its chunk
  knobs (chunk, decoder chunk, stored steps, selective checkpointing), the render and output
  sizes, and under `--released-compat` the released timestep list and clamp; the transformer
  blocks' inner checkpointing (`--checkpoint-attention`);
- the distillation network (`NetworkSpec`) and the algorithm (DM, DC, MTT and its options);
- the augmentation (DSA) and the autocast dtype.
The class groups an iteration goes through are decided from these by
`ld3m_fast.distill.iteration.render_groups`. `Iteration.describe()` lists what was assembled
(plain values) and `describe_step` adds what a step context decides (seeded streams, this
process's rows, the class groups): equal descriptions are the same iteration, which is how a
plan is tied to the run it plans (tests/test_run_description.py).

The config must have concrete chunk knobs here: `--chunk auto` is resolved before (the run asks
the planner, `ld3m_fast.distill.planner.plan.choose_knobs`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from ..choices import torch_dtype
from ..errors import LD3MError
from ..generator import LD3MGenerator, render_size
from .algorithms import MTT, NetworkSpec, StepContext, build_algorithm
from .config import DistillConfig


# --------------------------------------------------------------------------- sizes


def denoiser_multiple(prior) -> int:
    """The latent side must be a multiple of this for the denoiser to take it: the UNet's
    total downsampling (2 per down block after the first) or the DiT's patch size."""
    config = getattr(prior.denoiser.model, "config", {})
    if "patch_size" in config and config.get("patch_size"):
        return int(config["patch_size"])
    blocks = config.get("down_block_types") or config.get("block_out_channels") or ()
    return 2 ** max(0, len(blocks) - 1)


def resolve_resolution(prior, res: int | None, *, released: bool = False) -> int:
    """The output side: `res` or the prior's native size, checked against what the prior can render
    (at `res` itself with `released`, see `render_size`)."""
    res = prior.image_size if res is None else int(res)
    factor = prior.latent_factor
    if res % factor:
        raise LD3MError(f"--res {res} is not a multiple of the prior's latent factor {factor}; "
                        f"use e.g. {prior.image_size} (the prior's native size)")
    render = render_size(prior, res, released=released)
    latent, multiple = render // factor, denoiser_multiple(prior)
    if latent % multiple:
        step = factor * multiple
        below = [r for r in range(step, prior.image_size + 1, step)]
        above = "" if released else f" or any multiple of {factor} above it"
        raise LD3MError(f"--res {res} renders {latent}x{latent} latents, but the prior's denoiser needs a "
                        f"side divisible by {multiple}; use a multiple of {step} up to {prior.image_size} "
                        f"(e.g. {', '.join(map(str, below[-3:]))}){above}")
    return res


# --------------------------------------------------------------------------- the pieces


def chunk_knobs(config: DistillConfig) -> dict:
    """The generator's chunk and recompute knobs as the config sets them (concrete, not auto)."""
    if config.chunk == "auto":
        raise ValueError("--chunk auto is resolved by the planner before the iteration is assembled")
    return dict(chunk_size=config.chunk, decoder_chunk=config.decoder_chunk,
                store_steps=config.store_steps or 0,
                sac_min_flops=config.sac_min_flops if config.store_steps else None)


def generator_options(config: DistillConfig, prior, res: int) -> dict:
    """Every `LD3MGenerator` argument but the prior, from the config."""
    render = render_size(prior, res, released=config.released_compat)
    options = dict(guidance=config.guidance, skip=None if config.skip == "none" else config.skip,
                   eta=config.eta, grad_mode=config.grad_mode, render_size=render,
                   output_size=None if res == render else res,
                   checkpoint_attention=config.attention_checkpointed, **chunk_knobs(config))
    if config.released_compat:  # the released timestep list and its clamp of decoded images
        options.update(spacing="released", clamp=True)
    return options


def build_generator(config: DistillConfig, prior, res: int) -> LD3MGenerator:
    return LD3MGenerator(prior, config.steps, **generator_options(config, prior, res))


def build_network_spec(config: DistillConfig, res: int, num_classes: int) -> NetworkSpec:
    """The distillation network; an unknown norm or an impossible depth fails now, not at iteration 1."""
    network = NetworkSpec(num_classes=num_classes, res=res, width=config.width, depth=config.depth,
                          norm=config.norm, compile_backend=config.compile_backend if config.compile else None)
    network.build()
    return network


def buffer_expectation(network: NetworkSpec) -> dict:
    """What an expert buffer must have been trained with to fit the student `network`."""
    return {"arch": network.arch, "depth": network.depth, "width": network.width, "norm": network.norm,
            "res": network.res, "num_classes": network.num_classes, "channels": network.channels}


def mtt_options(config: DistillConfig) -> dict:
    return dict(syn_steps=config.syn_steps, expert_epochs=config.expert_epochs,
                max_start_epoch=config.max_start_epoch, student_lr=config.student_lr,
                gradient=config.mtt_gradient, batch_syn=config.batch_syn,
                # The released script applies its truncated image gradient at half size (`2 * tuple`).
                image_grad_scale=MTT.RELEASED_IMAGE_GRAD_SCALE if config.released_compat else 1.0)


def build_algorithm_for(config: DistillConfig, network: NetworkSpec, trajectories=None):
    options = mtt_options(config) if config.algorithm == "mtt" else {}
    return build_algorithm(config.algorithm, network, trajectories=trajectories, batch_real=config.batch_real,
                           micro_batch=config.micro_batch, **options)


def build_dsa(config: DistillConfig):
    from ..dsa import DSA

    if config.dsa in (None, "", "none"):
        return None
    try:
        return DSA(config.dsa)
    except ValueError as error:
        raise LD3MError(f"--dsa: {error}") from None


# --------------------------------------------------------------------------- the iteration


@dataclass
class Iteration:
    """One distillation iteration's pieces, as a config defines them."""

    config: DistillConfig
    res: int
    num_classes: int
    generator: LD3MGenerator
    network: NetworkSpec
    algorithm: object
    dsa: object | None

    @property
    def render_size(self) -> int:
        """The side the chain renders at (the output side, or the prior's native one below it)."""
        return self.generator.latent_shape[-1] * self.generator.prior.latent_factor

    def autocast(self, device_type: str):
        """The config's autocast (fp32: none)."""
        if self.config.dtype == "fp32":
            return nullcontext()
        return torch.autocast(device_type, dtype=torch_dtype(self.config.dtype))

    def describe(self) -> dict:
        """What this iteration computes and holds, as plain values."""
        return {"prior": describe_prior(self.generator.prior), "res": self.res, "num_classes": self.num_classes,
                "dtype": self.config.dtype, "momentum": self.config.momentum,
                "generator": self.generator.describe(), "algorithm": describe_algorithm(self.algorithm),
                "dsa": describe_dsa(self.dsa)}


def assemble_iteration(config: DistillConfig, prior, *, num_classes: int, trajectories=None,
                       res: int | None = None) -> Iteration:
    """The iteration `config` describes over `prior` for `num_classes` classes.

    res: the output side, already checked (default: resolved from config.res and the prior);
    trajectories: MTT's expert trajectories (required for MTT)."""
    if res is None:
        res = resolve_resolution(prior, config.res, released=config.released_compat)
    network = build_network_spec(config, res, num_classes)
    algorithm = build_algorithm_for(config, network, trajectories)
    return Iteration(config, res, num_classes, build_generator(config, prior, res), network, algorithm,
                     build_dsa(config))


def apply_knobs(iteration: Iteration, config: DistillConfig) -> None:
    """Give a running iteration the chunk knobs of `config` (a plan made after an out-of-memory
    error): a new generator over the same prior; the algorithm keeps its state (MTT's student lr
    is in the optimiser) and takes the new student micro-batch."""
    from .algorithms import check_micro_batch

    iteration.config = config
    iteration.generator = build_generator(config, iteration.generator.prior, iteration.res)
    iteration.algorithm.micro_batch = check_micro_batch(iteration.network, config.micro_batch)


def build_context(iteration: Iteration, real, *, seed: int | None, device=None, comm=None,
                  rows: slice | None = None, total_images: int | None = None, iteration_number: int = 0):
    """The step context of `iteration`: its real data, augmentation, streams and process share."""
    options = {} if comm is None else {"comm": comm}
    return StepContext(real=real, dsa=iteration.dsa, device=torch.device(device or "cpu"), seed=seed,
                       iteration=iteration_number, rows=rows, total_images=total_images, **options)


def build_optimizer(config: DistillConfig, synthetic, algorithm, *, lr_latent: float | None = None,
                    lr_class: float | None = None) -> torch.optim.SGD:
    """SGD with the config's momentum over Z, c and the algorithm's own parameters (MTT's
    student lr); learning rates default to the config's, then the algorithm's."""
    lr_latent = lr_latent if lr_latent is not None else config.lr_latent
    lr_latent = algorithm.default_lr_latent if lr_latent is None else lr_latent
    lr_class = lr_class if lr_class is not None else config.lr_class
    lr_class = algorithm.default_lr_class if lr_class is None else lr_class
    groups = [{"params": [synthetic.Z], "lr": lr_latent}, {"params": [synthetic.c], "lr": lr_class}]
    if algorithm.parameters():
        groups.append({"params": algorithm.parameters(), "lr": config.lr_student})
    return torch.optim.SGD(groups, lr=lr_latent, momentum=config.momentum)


# --------------------------------------------------------------------------- descriptions


def describe_prior(prior) -> dict:
    """The prior's architecture: its models' classes and configurations and its class table's shape
    (weights are not part of it: a plan walks the architecture alone)."""
    def model(adapter) -> dict:
        config = getattr(adapter.model, "config", {})
        return {"class": type(adapter.model).__name__,
                "config": {k: _plain(v) for k, v in sorted(dict(config).items()) if not k.startswith("_")}}

    return {"denoiser": model(prior.denoiser), "autoencoder": model(prior.autoencoder),
            "class_table": list(prior.class_table.shape), "image_size": prior.image_size,
            "latent_factor": prior.latent_factor}


def describe_algorithm(algorithm) -> dict:
    keys = ("per_class", "batch_real", "micro_batch", "syn_steps", "expert_epochs", "max_start_epoch",
            "gradient", "batch_syn", "image_grad_scale")
    described = {"class": type(algorithm).__name__, "name": algorithm.name,
                 **{k: getattr(algorithm, k) for k in keys if hasattr(algorithm, k)}}
    network = getattr(algorithm, "network", None)
    if network is not None:
        described["network"] = {k: v for k, v in dataclasses.asdict(network).items() if k != "compile_backend"}
    return described


def describe_dsa(dsa) -> dict | None:
    if dsa is None:
        return None
    return {"groups": list(dsa.groups), "batch_shared": dsa.batch_shared,
            "params": dataclasses.asdict(dsa.params)}


def describe_step(iteration: Iteration, context, labels) -> dict:
    """`iteration.describe()` with what the step context decides: seeded streams, this process's
    rows of the whole set, and the class groups the images go through."""
    from .._host import host_values
    from .iteration import render_groups

    with host_values():
        mine = labels if context.rows is None else labels[context.rows]
        groups = render_groups(iteration.generator, iteration.algorithm, mine, context)
        count = int(mine.shape[0])
    rows = context.rows
    return {**iteration.describe(), "seeded": context.seed is not None,
            "rows": None if rows is None else [rows.start, rows.stop], "total_images": context.total_images,
            "groups": [list(g.indices(count))[:2] for g in groups]}


def digest(description: dict) -> str:
    """A short stable hash of a description."""
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:16]


def _plain(value):
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


__all__ = ["Iteration", "apply_knobs", "assemble_iteration", "buffer_expectation", "build_context", "build_dsa",
           "build_generator", "build_network_spec", "build_optimizer", "chunk_knobs", "denoiser_multiple",
           "describe_step", "digest", "generator_options", "resolve_resolution"]

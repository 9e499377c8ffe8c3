"""`ld3m-fast plan`: peak memory and FLOPs per iteration of a run, before it starts.

The flags are the run's own (`DistillConfig`, the same declaration `ld3m-fast distill`
reads: `--config`, `--preset`, `--memory-budget` work as there), the ones a plan depends on.
A knob the settings fix stays fixed (`--chunk 10`, `--store-steps 5`, `--micro-batch 10`);
the ones left unset are the planner's to choose, as `distill --chunk auto` does. Plan-only
flags: `--classes` (default: the subset's or Fashion-MNIST's count), `--world-size N` (one
GPU of an N-process run, `torchrun`, docs/distributed.md) and `--json PATH`.

Prints every candidate the planner simulated, its choice, and the released scheme in the
same setting. `--json PATH` writes one object:

    {"setting": {prior, res, ipc, classes, steps, algorithm, dtype, budget_bytes, usable_bytes,
                 reserve_bytes, world_size, ..., "config": the walked settings},
     "candidates": [{mode, chunk, decoder_chunk, micro_batch, store_steps, sac_min_flops, dtype,
                     peak_bytes, flops, fits, ...}],
     "choice": one of the candidates with its "flags", or null,
     "released": {chunk, peak_bytes, flops, ...}}
"""
from __future__ import annotations

import json
import logging

from ..bounds import COUNT
from ..errors import LD3MError
from .settings import add_setting_arguments, config_from_args

logger = logging.getLogger(__name__)

# Settings besides the walked ones that a plan reads: where the classes come from, the budget.
PLAN_SETTINGS = ("preset", "data", "subset", "memory_budget", "memory_reserve", "device")
FASHION_MNIST_CLASSES = 10


def add_arguments(parser):
    from ..distill.config import WALKED

    add_setting_arguments(parser, names=set(WALKED) | set(PLAN_SETTINGS))
    parser.add_argument("--classes", type=COUNT, default=None,
                        help="classes of the run (default: the --subset's count, or Fashion-MNIST's 10)")
    parser.add_argument("--world-size", type=COUNT, default=1,
                        help="processes (GPUs) of the run: plan one rank's share of the classes (default 1)")
    parser.add_argument("--json", default=None, help="also write setting, candidates, choice and the released "
                                                     "scheme as one JSON object here")


def run_classes(args, config) -> int:
    """--classes, or the count the run's data will have when it is known without reading it."""
    if args.classes is not None:
        return args.classes
    if config.subset is not None:
        from ..data.subsets import resolve_subset

        return len(resolve_subset(config.subset).imagenet_indices)
    if config.data == "fashion-mnist":
        return FASHION_MNIST_CLASSES
    raise LD3MError(f"give --classes N: the number of classes of --data {config.data!r} is not known "
                    "without reading it")


def _settings(args):
    """The run's settings; a preset without --prior plans its prior's architecture (cin256-v2,
    dit-xl-2-256), which needs no weights."""
    from ..presets import get_preset
    from .settings import given_settings

    given = given_settings(args)
    if given.get("preset") and given.get("prior") is None:
        architecture = get_preset(given["preset"]).prior_name
        if architecture:
            return config_from_args(args, preset_needs=(), prior=architecture)
    return config_from_args(args, preset_needs=("prior",))


def check_steps(config) -> None:
    """T below the prior's training timesteps (`check_chain_steps`), before anything is simulated."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from ..distill.planner.priors import build_planning_prior
    from ..distill.setup import check_chain_steps

    with FakeTensorMode(allow_non_fake_inputs=True):
        prior = build_planning_prior(config.prior)
    check_chain_steps(config.steps, len(prior.alphas_cumprod))


def run(args) -> int:
    from .._files import check_writable_file, write_text_atomic
    from ..distill.planner.memory import format_bytes, memory_budget
    from ..distill.planner.plan import (base_walk, format_table, knob_flags, plan, planning_config,
                                        released_reference, search_space)

    if args.json:
        check_writable_file(args.json, "--json")
    config = planning_config(_settings(args))
    check_steps(config)
    classes = run_classes(args, config)
    budget = memory_budget(config.memory_budget, config.memory_reserve, config.device)
    walk = base_walk(config, classes, args.world_size)
    ranks = ("" if walk.world_size == 1 else
             f", one GPU of {walk.world_size} ({walk.local_classes} classes = {walk.images} images on the busiest)")
    print(f"planning {config.algorithm.upper()} on {config.prior} at {config.res}², IPC {config.ipc} x "
          f"{classes} classes{ranks}, T={config.steps}, {config.grad_mode}, {config.dtype}, budget "
          f"{budget.describe()} (simulated with fake tensors on the CPU dispatch path)")
    candidates, best = plan(walk, budget.usable, progress=True, **search_space(config))  # walks: --verbose
    print(format_table(candidates, best, budget.usable))
    released = released_reference(walk)
    print(f"released scheme, same setting (chunk {released.walk.config.chunk}, full-batch student, fp32, "
          f"transformer blocks checkpointed inside as released): peak {format_bytes(released.peak_bytes)}, "
          f"{released.tflops:.1f} TFLOP per iteration")
    if best is None:
        print("nothing fits the budget: lower --ipc, set a smaller --micro-batch, or raise --memory-budget")
    else:
        e = best.estimate
        print(f"choice: {knob_flags(best.walk)} ({best.mode}; peak {format_bytes(e.peak_bytes)} of "
              f"{format_bytes(budget.usable)} usable, {e.tflops:.1f} TFLOP per iteration, "
              f"{e.flops / released.flops:.2f}x the released scheme's FLOPs)")
    if args.json:
        setting = {"prior": config.prior, "res": config.res, "ipc": config.ipc, "classes": classes,
                   "steps": config.steps, "algorithm": config.algorithm, "dtype": config.dtype,
                   "budget_bytes": budget.budget, "usable_bytes": budget.usable, "reserve_bytes": budget.reserve,
                   "budget_source": budget.source, "guidance": config.guidance, "grad_mode": config.grad_mode,
                   "world_size": walk.world_size, "classes_per_gpu": walk.local_classes,
                   "device": "simulated (fake tensors, CPU dispatch path)", "config": config.walked_settings()}
        write_text_atomic(args.json, json.dumps(summary(setting, candidates, best, released), indent=2) + "\n")
        logger.info(f"JSON: {args.json}")
    return 0 if best is not None else 1


def summary(setting: dict, candidates, best, released) -> dict:
    """The --json object."""
    from ..distill.planner.plan import knob_flags

    choice = None if best is None else {**best.summary(), "flags": knob_flags(best.walk)}
    return {"setting": setting, "candidates": [c.summary() for c in candidates], "choice": choice,
            "released": {"chunk": released.walk.config.chunk, "peak_bytes": int(released.peak_bytes),
                         "flops": int(released.flops), "micro_batch": None, "dtype": "fp32",
                         "checkpoint_attention": True,
                         "phase_peaks": {k: int(v) for k, v in released.phase_peaks.items()}}}

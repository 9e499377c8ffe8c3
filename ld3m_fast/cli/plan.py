"""`ld3m-fast plan`: peak memory and FLOPs per iteration before a run starts.

Prints every candidate (mode, chunk, decoder chunk, dtype) the planner simulated, its choice,
and the released scheme in the same setting. `--world-size N` plans one GPU of an N-process
run (`torchrun`, docs/distributed.md): the busiest rank's classes, with the whole Z and c
every rank holds. `--json PATH` writes one object:

    {"setting": {prior, res, ipc, classes, steps, algorithm, budget_bytes, ...},
     "candidates": [{mode, chunk, decoder_chunk, dtype, peak_bytes, flops, fits, ...}],
     "choice": one of the candidates, or null,
     "released": {chunk, peak_bytes, flops, ...}}
"""
from __future__ import annotations

import json

from ..errors import LD3MError
from ..planner.plan import GRAPH, format_bytes, format_table, parse_bytes, plan, released_reference
from ..planner.simulate import IterationSpec


def add_arguments(parser):
    parser.add_argument("--prior", default="cin256-v2",
                        help="cin256-v2, dit-xl-2-256, or a prior folder (default cin256-v2)")
    parser.add_argument("--res", type=int, default=256)
    parser.add_argument("--ipc", type=int, default=10)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--steps", type=int, default=20, help="T, DDIM steps")
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--algorithm", choices=("dm", "dc", "mtt"), default="dm")
    parser.add_argument("--grad-mode", choices=("autograd", "released", "recompute"), default="recompute")
    parser.add_argument("--micro-batch", type=int, default=10,
                        help="student micro-batch (exact with per-sample norm); 0 = full batch")
    parser.add_argument("--syn-steps", type=int, default=10)
    parser.add_argument("--mtt-gradient", choices=("truncated", "full"), default="truncated")
    parser.add_argument("--budget", default="24GiB", help="device memory budget (per GPU), e.g. 24GiB, 40GB")
    parser.add_argument("--world-size", type=int, default=1,
                        help="processes (GPUs) of the run: plan one rank's share of the classes (default 1)")
    parser.add_argument("--chunks", default="", help="comma-separated chunk sizes to try (default: automatic)")
    parser.add_argument("--decoder-chunks", default="",
                        help="comma-separated decoder chunk sizes to try (default: 1, 2, 5, ... up to the chunk)")
    parser.add_argument("--store-steps", default="",
                        help="comma-separated counts k of last steps stored from the render pass, 0 = pure "
                             "recompute (default: 0, T/4, T/2, 3T/4, T)")
    parser.add_argument("--sac-min-flops", default="",
                        help="what a stored step keeps: comma-separated thresholds N (selective checkpointing "
                             "keeps ops doing >= N FLOPs per output element) and/or 'graph' (default: levels "
                             "from the prior, and graph)")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--json", default=None, help="also write setting, candidates, choice and the released "
                                                     "scheme as one JSON object here")


def spec_from_args(args) -> IterationSpec:
    from ..distributed import class_share

    if args.world_size < 1:
        raise LD3MError(f"--world-size must be >= 1, got {args.world_size}")
    class_share(args.classes, 0, args.world_size)  # more processes than classes: one line
    return IterationSpec(prior=args.prior, res=args.res, ipc=args.ipc, num_classes=args.classes,
                         steps=args.steps, guidance=args.guidance, algorithm=args.algorithm,
                         grad_mode=args.grad_mode, micro_batch=args.micro_batch or None,
                         syn_steps=args.syn_steps, mtt_gradient=args.mtt_gradient, world_size=args.world_size)


def _ints(text: str, flag: str) -> list[int] | None:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise LD3MError(f"{flag} takes comma-separated whole numbers, got {text!r}") from None
    return values or None


def _levels(text: str) -> list[float | None] | None:
    levels = []
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        if item == GRAPH:
            levels.append(None)
            continue
        try:
            levels.append(float(item))
        except ValueError:
            raise LD3MError(f"--sac-min-flops takes numbers or 'graph', got {item!r}") from None
    return levels or None


def summary(setting: dict, candidates, best, released) -> dict:
    """The --json object."""
    return {"setting": setting, "candidates": [c.summary() for c in candidates],
            "choice": None if best is None else best.summary(),
            "released": {"chunk": released.spec.chunk, "peak_bytes": int(released.peak_bytes),
                         "flops": int(released.flops), "micro_batch": released.spec.micro_batch,
                         "dtype": released.spec.dtype, "checkpoint_attention": True,
                         "phase_peaks": {k: int(v) for k, v in released.phase_peaks.items()}}}


def run(args) -> int:
    from pathlib import Path

    from .._files import write_text_atomic

    budget = parse_bytes(args.budget)
    spec = spec_from_args(args)
    chunks = _ints(args.chunks, "--chunks")
    ranks = ("" if spec.world_size == 1 else
             f", one GPU of {spec.world_size} ({spec.local_classes} classes = {spec.images} images on the busiest)")
    print(f"planning {spec.algorithm.upper()} on {spec.prior} at {spec.res}², IPC {spec.ipc} x "
          f"{spec.num_classes} classes{ranks}, T={spec.steps}, {spec.grad_mode}, budget {format_bytes(budget)} "
          "(simulated with fake tensors on the CPU dispatch path)")
    candidates, best = plan(spec, budget, chunks=chunks, dtypes=tuple(args.dtypes.split(",")),
                            decoder_chunks=_ints(args.decoder_chunks, "--decoder-chunks"),
                            store_steps=_ints(args.store_steps, "--store-steps"),
                            sac=_levels(args.sac_min_flops), log=print)
    print(format_table(candidates, best, budget))
    released = released_reference(spec)
    print(f"released scheme, same setting (chunk {released.spec.chunk}, full-batch student, fp32, transformer "
          f"blocks checkpointed inside as released): peak {format_bytes(released.peak_bytes)}, "
          f"{released.tflops:.1f} TFLOP per iteration")
    if best is None:
        print("nothing fits the budget: lower --ipc, the student --micro-batch, or raise --budget")
    else:
        e, s = best.estimate, best.spec
        knobs = f" --decoder-chunk {s.decoder_chunk}" if s.decoder_chunk else ""
        if s.store_steps:
            knobs += f" --store-steps {s.store_steps}"
            knobs += f" --sac-min-flops {s.sac_min_flops:g}" if s.sac_min_flops is not None else ""
        print(f"choice: --chunk {s.chunk}{knobs} --dtype {s.dtype} ({best.mode}; peak "
              f"{format_bytes(e.peak_bytes)}, {e.tflops:.1f} TFLOP per iteration, "
              f"{e.flops / released.flops:.2f}x the released scheme's FLOPs)")
    if args.json:
        setting = {"prior": spec.prior, "res": spec.res, "ipc": spec.ipc, "classes": spec.num_classes,
                   "steps": spec.steps, "algorithm": spec.algorithm, "budget_bytes": budget,
                   "guidance": spec.guidance, "micro_batch": spec.micro_batch, "grad_mode": spec.grad_mode,
                   "world_size": spec.world_size, "classes_per_gpu": spec.local_classes,
                   "device": "simulated (fake tensors, CPU dispatch path)"}
        path = Path(args.json)
        write_text_atomic(path, json.dumps(summary(setting, candidates, best, released), indent=2) + "\n")
        print(f"JSON: {path}")
    return 0 if best is not None else 1

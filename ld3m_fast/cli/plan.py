"""`ld3m-fast plan`: peak memory and FLOPs per iteration before a run starts."""
from __future__ import annotations

import json

from ..planner.plan import format_bytes, format_table, parse_bytes, plan
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
    parser.add_argument("--budget", default="24GiB", help="device memory budget, e.g. 24GiB, 40GB")
    parser.add_argument("--chunks", default="", help="comma-separated chunk sizes to try (default: automatic)")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--json", default=None, help="also write the table as JSON here")


def spec_from_args(args) -> IterationSpec:
    return IterationSpec(prior=args.prior, res=args.res, ipc=args.ipc, num_classes=args.classes,
                         steps=args.steps, guidance=args.guidance, algorithm=args.algorithm,
                         grad_mode=args.grad_mode, micro_batch=args.micro_batch or None,
                         syn_steps=args.syn_steps, mtt_gradient=args.mtt_gradient)


def run(args) -> int:
    from .._files import write_text_atomic

    budget = parse_bytes(args.budget)
    spec = spec_from_args(args)
    chunks = [int(c) for c in args.chunks.split(",") if c.strip()] or None
    print(f"planning {spec.algorithm.upper()} on {spec.prior} at {spec.res}², IPC {spec.ipc} x "
          f"{spec.num_classes} classes, T={spec.steps}, {spec.grad_mode}, budget {format_bytes(budget)} "
          "(simulated with fake tensors on the CPU dispatch path)")
    candidates, best = plan(spec, budget, chunks=chunks, dtypes=tuple(args.dtypes.split(",")), log=print)
    print(format_table(candidates, best, budget))
    if best is None:
        print("nothing fits the budget: lower --ipc, the student --micro-batch, or raise --budget")
    else:
        e = best.estimate
        print(f"choice: --chunk {e.spec.chunk} --dtype {e.spec.dtype} "
              f"(peak {format_bytes(e.peak_bytes)}, {e.tflops:.1f} TFLOP per iteration)")
    if args.json:
        from pathlib import Path

        rows = [{**c.estimate.spec.describe(), "peak_bytes": c.estimate.peak_bytes,
                 "flops": c.estimate.flops, "phase_peaks": c.estimate.phase_peaks,
                 "fits": c.fits, "chosen": c is best, "method": c.estimate.method}
                for c in candidates]
        write_text_atomic(Path(args.json), json.dumps({"budget_bytes": budget, "rows": rows}, indent=2))
    return 0 if best is not None else 1

"""Distributed distillation (docs/distributed.md): measured speed-up on CPU, simulated per-GPU table.

    python benchmarks/bench_distributed.py [--rounds 5] [--iterations 6] [--out DIR] [-- DISTILL FLAGS]
    python benchmarks/bench_distributed.py --table [--budget 79GiB] [--presets NAME,...] [--out DIR]

Default (measured, on this machine): DM at IPC 10 on the embedded default (`ld3m-fast distill`'s
default prior and data), as 2 processes x 1 thread (`torchrun --nproc-per-node 2`, gloo) against
1 process x 1 thread. Paired, interleaved rounds (1 process, then 2, in every round), each run a
fresh `ld3m-fast distill` in its own folder; per run the seconds per iteration come from its
metrics.jsonl (rank 0's `seconds`: the iteration including the gradient all-reduce, without the
start-up, checkpoints and logging), the first iteration left out as warm-up. Reports median and
min-max per side and the ratio of medians; writes bench_distributed.{json,md} in --out.

--table (simulated, no GPU involved): `ld3m-fast plan --preset NAME --world-size N` for the
ImageNet-1K presets (`ld3m-fast presets`: DM, 1000 classes, cin256-v2 and DiT-XL/2-256 at 128² and
256², IPC 1, 10, 50; their priors' architectures) on 8 and 64 GPUs: the planner's choice for one
GPU's share within --budget less the default reserve (1 GiB + 5%), its peak and TFLOP per
iteration. A preset's cells share their walks (the planner extrapolates in classes). Writes
planner_table.{json,md} in --out.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
DEFAULT_OUT = ROOT / "results" / "distributed"
TABLE_CLASSES = 1000
TABLE_WORLD = (8, 64)
SIMULATED = "simulated (fake tensors, CPU dispatch path); no GPU ran this"


def _meta() -> dict:
    from ld3m_fast._host import cpu_model

    return {"torch": torch.__version__, "python": platform.python_version(),
            "machine": f"CPU: {cpu_model()} ({os.cpu_count()} cores)"}


def _write(out: Path, stem: str, payload: dict, markdown: str) -> None:
    from ld3m_fast._files import write_text_atomic

    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / f"{stem}.json", json.dumps(payload, indent=2) + "\n")
    write_text_atomic(out / f"{stem}.md", markdown)
    print(f"wrote {out / stem}.json and .md")


# --------------------------------------------------------------------------- simulated table


def table(args) -> int:
    """`ld3m-fast plan --preset NAME --world-size N` for every ImageNet-1K preset: the planner's
    choice for one GPU's share, under the default reserve of --budget."""
    from ld3m_fast.distill.config import DistillConfig
    from ld3m_fast.distill.planner.memory import format_bytes, memory_budget
    from ld3m_fast.distill.planner.plan import base_walk, knob_flags, plan, planning_config, search_space
    from ld3m_fast.presets import PRESETS, with_preset

    budget = memory_budget(args.budget, None)
    names = [n for n in PRESETS if "-in1k-" in n and (not args.presets or n in args.presets.split(","))]
    rows = []
    for name in names:
        preset = PRESETS[name]
        settings = with_preset({"preset": name, "prior": preset.prior_name}, needs=())
        config = planning_config(DistillConfig.from_dict({**DistillConfig().to_dict(), **settings}))
        for world in TABLE_WORLD:
            started = time.process_time()
            walk = base_walk(config, TABLE_CLASSES, world)
            _, best = plan(walk, budget.usable, **search_space(config))
            row = {"preset": name, "prior": config.prior, "res": config.res, "ipc": config.ipc,
                   "steps": config.steps, "classes": TABLE_CLASSES, "world_size": world,
                   "classes_per_gpu": walk.local_classes, "images_per_gpu": walk.images,
                   "budget_bytes": budget.budget, "usable_bytes": budget.usable, "fits": best is not None,
                   "device": SIMULATED, "cpu_seconds": round(time.process_time() - started, 1)}
            if best is not None:
                e = best.estimate
                row.update(mode=best.mode, flags=knob_flags(best.walk), peak_bytes=int(e.peak_bytes),
                           peak_gib=e.peak_bytes / 2**30, tflops_per_iteration=e.tflops, method=e.method)
            rows.append(row)
            print(f"  {name}, {world} GPU(s): {walk.local_classes} classes per GPU, "
                  + (f"{row['flags']}, peak {format_bytes(row['peak_bytes'])}, {row['tflops_per_iteration']:.0f} "
                     f"TFLOP/iteration" if best else "nothing fits") + f" ({row['cpu_seconds']:.0f} s CPU)", flush=True)
    lines = [f"Per GPU, simulated (`ld3m-fast plan --preset NAME --world-size N`; fake tensors on the CPU dispatch "
             f"path, no GPU ran this): the ImageNet-1K presets ({TABLE_CLASSES} classes, DM), their priors' "
             f"architectures with random weights, fp32; the planner's choice for {budget.describe()} per GPU. "
             "Classes per GPU = the busiest rank's (ceil(1000/N)). Peak: one iteration's, the whole Z and c "
             "(+ momentum, + gradient) held on every GPU; TFLOP: one iteration of the busiest GPU.", "",
             "| preset | GPUs | classes/GPU | planner's choice | peak per GPU | TFLOP/iteration per GPU |",
             "|---|---:|---:|---|---:|---:|"]
    for r in rows:
        cells = (f"{r['mode']}: `{r['flags']}` | {r['peak_gib']:.2f} GiB | {r['tflops_per_iteration']:.0f}"
                 if r["fits"] else "nothing fits | - | -")
        lines.append(f"| {r['preset']} | {r['world_size']} | {r['classes_per_gpu']} | {cells} |")
    _write(Path(args.out), "planner_table", {"meta": _meta(), "rows": rows}, "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


# --------------------------------------------------------------------------- measured speed-up


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _distill(processes: int, run_dir: Path, args, extra: list[str]) -> list[float]:
    """One fresh run; its seconds per iteration (rank 0's metrics), first iteration dropped."""
    flags = ["distill", "--ipc", str(args.ipc), "--iterations", str(args.iterations), "--threads", "1",
             "--no-progress", "--out", str(run_dir), "--save-seconds", "100000", "--image-every", "100000",
             *extra]
    if processes == 1:
        command = [sys.executable, "-m", "ld3m_fast", *flags]
    else:
        torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"
        command = [torchrun, "--nproc-per-node", str(processes), "--master-port", str(_free_port()),
                   "-m", "ld3m_fast", *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    seconds = [r["seconds"] for r in records if "seconds" in r and "iteration" in r]
    return seconds[1:]  # the first iteration warms caches and allocators up


def speedup(args, extra: list[str]) -> int:
    if args.iterations < 2:
        raise SystemExit("--iterations must be >= 2 (the first iteration is left out)")
    sides = {1: [], 2: []}
    medians = {1: [], 2: []}
    with tempfile.TemporaryDirectory(prefix="bench_distributed_") as tmp:
        for r in range(args.rounds):
            for processes in (1, 2):  # interleaved: both sides see the same machine state
                times = _distill(processes, Path(tmp) / f"round{r}-p{processes}", args, extra)
                sides[processes] += times
                medians[processes].append(statistics.median(times))
                print(f"  round {r + 1}/{args.rounds}, {processes} process(es) x 1 thread: "
                      f"{statistics.median(times):.3f} s/iteration (median of {len(times)})", flush=True)
    summary = {p: {"median_s": statistics.median(t), "min_s": min(t), "max_s": max(t), "iterations": len(t),
                   "round_medians_s": medians[p]} for p, t in sides.items()}
    ratio = summary[1]["median_s"] / summary[2]["median_s"]
    paired = [a / b for a, b in zip(medians[1], medians[2])]
    setting = (f"DM, IPC {args.ipc}, `ld3m-fast distill` defaults (embedded prior and data)"
               + (f" with {' '.join(extra)}" if extra else "")
               + f"; {args.iterations} iterations per run (first left out), {args.rounds} interleaved rounds")
    payload = {"meta": _meta(), "setting": setting, "distill_flags": extra, "ipc": args.ipc,
               "iterations": args.iterations, "rounds": args.rounds,
               "sides": {"1 process x 1 thread": summary[1], "2 processes x 1 thread (gloo)": summary[2]},
               "speedup_of_medians": ratio, "speedup_per_round": paired,
               "device": f"measured on this machine's CPU ({_meta()['machine']})"}
    lines = [f"Measured on {_meta()['machine']}, torch {torch.__version__}: {setting}. "
             "Seconds per iteration from rank 0's metrics.jsonl (the iteration with its gradient all-reduce; "
             "start-up, checkpoints and logging excluded).", "",
             "| processes x threads | s/iteration, median | min-max | iterations |",
             "|---|---:|---:|---:|"]
    for name, p in (("1 x 1", 1), ("2 x 1 (torchrun, gloo)", 2)):
        s = summary[p]
        lines.append(f"| {name} | {s['median_s']:.3f} | {s['min_s']:.3f}-{s['max_s']:.3f} | {s['iterations']} |")
    lines += ["", f"Speed-up (ratio of medians): {ratio:.2f}x; per round: "
              + ", ".join(f"{x:.2f}" for x in paired)]
    _write(Path(args.out), "bench_distributed", payload, "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if "--" in argv:
        at = argv.index("--")
        argv, extra = argv[:at], argv[at + 1:]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", action="store_true", help="the simulated per-GPU planner table instead")
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    parser.add_argument("--rounds", type=int, default=5, help="measured: interleaved rounds (default 5)")
    parser.add_argument("--iterations", type=int, default=6,
                        help="measured: iterations per run, the first left out (default 6)")
    parser.add_argument("--ipc", type=int, default=10)
    parser.add_argument("--budget", default="79GiB", help="--table: device memory per GPU before the reserve "
                                                          "(default 79GiB: an 80 GB card's free memory at start)")
    parser.add_argument("--presets", default="", help="--table: comma-separated preset names (default: every "
                                                      "ImageNet-1K preset)")
    args = parser.parse_args(argv)
    return table(args) if args.table else speedup(args, extra)


if __name__ == "__main__":
    sys.exit(main())

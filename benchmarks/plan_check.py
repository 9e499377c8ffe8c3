"""Planned peaks held against measured ones: real iterations of a full-size prior on this CPU.

    python benchmarks/plan_check.py --out DIR [--prior cin256-v2] [--rows NAME,...] [--threads N]

For every kind of plan the planner can choose, one real distillation iteration of the prior's
full-size architecture with random weights (cin256-v2 by default: UNet 400.9 M + VQ-f4 55.3 M) at
256², sized to fit a 24 GB machine (one or two classes, IPC 1-2, T = 2-4, 16 real images per
class): pure recompute, the decoder in pieces, stored steps whole and under selective activation
checkpointing, a stored-step count between 0 and T (interpolated by the planner), class groups,
student micro-batches, bf16. The iteration is the one the planner walks: `build_walked(walk,
prior=<random weights>)`, assembled from the same config by `ld3m_fast.distill.assemble`.

Per row: the planner's predicted peak (`ld3m_fast.distill.planner.simulate.estimate`, fake tensors)
beside the **measured** peak from an independent source, the CPU allocator's own accounting as
`torch.profiler` records it (`profile_memory=True`: the running total of allocated bytes the c10
allocator reports with every allocation, counted from before the prior was built, so weights and
resident tensors are in it; `ld3m_fast.distill.planner.measure.allocator_peak`). Each row runs in
a fresh process (a clean allocator; its peak RSS is recorded too, which also holds Python, torch's
libraries and allocator slack). Writes DIR/plan_check.json (a list of rows {name, mode, chunk,
decoder_chunk, store_steps, sac_min_flops, micro_batch, dtype, classes, ipc, steps,
predicted_peak_bytes, measured_peak_bytes, ...}) and DIR/plan_check.md.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run from a checkout, installed or not

TOLERANCE = 0.10  # the target: every row within 10%
BASE = dict(res=256, ipc=2, steps=2, batch_real=16, algorithm="dm", chunk=2, decoder_chunk=2, micro_batch=None)
# id -> (what it is, settings over BASE, classes); "middle": the middle one of the planner's selective levels.
ROWS = {
    "recompute": ("recompute", {}, 1),
    "decoder-1": ("recompute, decoder in pieces of 1", dict(decoder_chunk=1), 1),
    "stored-graph": ("stored steps, whole graphs", dict(store_steps=2), 1),
    "stored-sac": ("stored steps, selective checkpointing", dict(store_steps=2, sac_min_flops="middle"), 1),
    "stored-2-of-4": ("stored steps 2 of 4 (interpolated)", dict(steps=4, store_steps=2, decoder_chunk=1), 1),
    "class-groups": ("class groups: 2 classes, stored steps", dict(ipc=1, chunk=1, decoder_chunk=1, store_steps=2), 2),
    "micro-batch-1": ("student micro-batches of 1", dict(micro_batch=1), 1),
    "bf16": ("bf16 autocast", dict(dtype="bf16"), 1),
}


def row_walk(prior: str, name: str, overrides: dict | None = None, classes: int | None = None):
    """The walk of row `name` on `prior` (with `overrides` of BASE and another class count, for the
    tests' small sizes and benchmarks/full_size_iteration.py)."""
    from ld3m_fast.distill.config import DistillConfig
    from ld3m_fast.distill.planner.plan import planning_config, sac_levels
    from ld3m_fast.distill.planner.simulate import Walk

    _, settings, row_classes = ROWS[name]
    classes = row_classes if classes is None else classes
    values = {**BASE, **(overrides or {}), **settings}
    if values.get("sac_min_flops") == "middle":  # the middle one of the planner's selective levels
        walk = Walk.of(planning_config(DistillConfig(prior=prior, **{**values, "sac_min_flops": None})), classes)
        levels = sac_levels(walk)
        values["sac_min_flops"] = levels[len(levels) // 2]
    return Walk.of(planning_config(DistillConfig(prior=prior, **values)), classes)


def measure_row(prior: str, name: str, overrides: dict | None = None, threads: int = 0,
                classes: int | None = None) -> dict:
    """One row in this process: the planner's prediction, then one real iteration under the profiler."""
    import torch

    from ld3m_fast.distill.planner.measure import allocator_peak
    from ld3m_fast.distill.planner.plan import knobs_of, mode_name
    from ld3m_fast.distill.planner.priors import build_planning_prior
    from ld3m_fast.distill.planner.simulate import build_walked, estimate

    if threads:
        torch.set_num_threads(threads)
    walk = row_walk(prior, name, overrides, classes)
    started = time.process_time()
    predicted = estimate(walk)
    planned_s = time.process_time() - started

    def build():
        torch.manual_seed(0)  # the random weights of a prior built from its config
        return build_walked(walk, prior=build_planning_prior(walk.config.prior),
                            generator=torch.Generator().manual_seed(0))

    timing = {"phases": {}}

    @contextmanager
    def phase(name):  # CPU seconds per phase of the iteration (render, distill, backward)
        begun = time.process_time()
        try:
            yield
        finally:
            timing["phases"][name] = timing["phases"].get(name, 0.0) + time.process_time() - begun

    def run(built):
        begun = time.process_time()
        built.run(phase)
        timing["cpu_s"] = time.process_time() - begun

    measured, resident, _ = allocator_peak(build, run)
    config = walk.config
    return {"name": name, "row": ROWS[name][0], "prior": config.prior, "res": config.res, "classes": walk.num_classes, "ipc": config.ipc,
            "steps": config.steps, "algorithm": config.algorithm, "mode": mode_name(walk), **knobs_of(walk),
            "dtype": config.dtype, "batch_real": config.batch_real,
            "predicted_peak_bytes": int(predicted.peak_bytes), "predicted_method": predicted.method,
            "predicted_phase_peaks": {k: int(v) for k, v in predicted.phase_peaks.items()},
            "measured_peak_bytes": int(measured), "measured_resident_bytes": int(resident),
            "measured_method": "torch.profiler profile_memory: the c10 CPU allocator's running total of "
                               "allocated bytes, from before the prior was built",
            "measured_over_predicted": round(measured / predicted.peak_bytes, 4),
            "iteration_cpu_s": round(timing["cpu_s"], 1), "planning_cpu_s": round(planned_s, 1),
            "phase_cpu_s": {k: round(v, 1) for k, v in timing["phases"].items()},
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "threads": torch.get_num_threads()}


def _spawn(prior: str, name: str, threads: int) -> dict:
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); from benchmarks.plan_check import measure_row; "
            "print('ROW ' + json.dumps(measure_row(sys.argv[2], sys.argv[3], threads=int(sys.argv[4]))))")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-c", code, str(ROOT), prior, name, str(threads)], env=env,
                          capture_output=True, text=True)
    rows = [line[4:] for line in done.stdout.splitlines() if line.startswith("ROW ")]
    if done.returncode or not rows:
        return {"name": name, "error": (done.stderr or done.stdout)[-2000:]}
    return json.loads(rows[-1])


def markdown(rows: list[dict], device: str) -> str:
    def gib(n):
        return f"{n / 2**30:.2f}"

    lines = [f"Planned against measured peak, one real iteration per row ({device}); random weights; "
             "measured: the CPU allocator's running total under torch.profiler (profile_memory).", "",
             "| row | mode | classes x IPC | T | chunk | decoder chunk | micro-batch | dtype | predicted GiB | "
             "measured GiB | measured / predicted | planner method | iteration CPU s |",
             "|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | failed: {r['error'].strip().splitlines()[-1][:120]} |" + " |" * 11)
            continue
        lines.append(f"| {r['row']} | {r['mode']} | {r['classes']} x {r['ipc']} | {r['steps']} | {r['chunk']} | "
                     f"{r['decoder_chunk']} | {r['micro_batch'] or 'all'} | {r['dtype']} | "
                     f"{gib(r['predicted_peak_bytes'])} | {gib(r['measured_peak_bytes'])} | "
                     f"{r['measured_over_predicted']:.3f} | {r['predicted_method']} | {r['iteration_cpu_s']} |")
    done = [r for r in rows if "error" not in r]
    if done:
        worst = max(done, key=lambda r: abs(r["measured_over_predicted"] - 1))
        lines += ["", f"Largest deviation: {worst['row']}, measured / predicted = "
                      f"{worst['measured_over_predicted']:.3f} (target: within {TOLERANCE:.0%})."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    from ld3m_fast._files import write_json_atomic, write_text_atomic
    from ld3m_fast._host import cpu_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "plan_check")
    parser.add_argument("--prior", default="cin256-v2", help="a planner prior name (cin256-v2, dit-xl-2-256, tiny)")
    parser.add_argument("--rows", default=",".join(ROWS), help="comma-separated row names (default: all)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per row (default: torch's)")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.rows.split(",") if n.strip()]
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {list(ROWS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    device = f"CPU: {cpu_model()}, {os.cpu_count()} cores"
    rows = []
    for name in names:
        print(f"{name} ...", flush=True)
        rows.append(_spawn(args.prior, name, args.threads))
        row = rows[-1]
        print(f"  {row.get('error', '').strip()[-300:]}" if "error" in row else
              f"  predicted {row['predicted_peak_bytes'] / 2**30:.2f} GiB, measured "
              f"{row['measured_peak_bytes'] / 2**30:.2f} GiB ({row['measured_over_predicted']:.3f}), "
              f"{row['iteration_cpu_s']} CPU s", flush=True)
        write_json_atomic(args.out / "plan_check.json", rows)
        write_text_atomic(args.out / "plan_check.md", markdown(rows, device))
    print(markdown(rows, device))
    bad = [r for r in rows if "error" in r or abs(r["measured_over_predicted"] - 1) > TOLERANCE]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

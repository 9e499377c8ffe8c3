"""Paired CPU measurements of the distillation iteration and of the DM student.

    python benchmarks/bench_student.py iteration --before /tmp/before [--after /tmp/after] [--pairs 5]
    python benchmarks/bench_student.py student [--repeats 5]
    python benchmarks/bench_student.py compile [--iterations 6]

`iteration`: the embedded default (`ld3m-fast distill` with no arguments: DM, Fashion-MNIST
32², IPC 1, T=10, batch_real 64), one thread, as paired and interleaved processes
A B A B ...: A imports the package from `--before` (a worktree of an older commit, put first
on PYTHONPATH), B from `--after` (another worktree) or this checkout. Each process runs one
warm-up iteration and then `--iterations` timed ones, recording per iteration CPU time (user +
system), system time and minor page faults (`resource.getrusage`). B applies the allocator setting the CLI applies at
start-up (`ld3m_fast._memory.keep_freed_memory`), when the package has it; `--allocator off`
leaves it out (to see what the setting alone does); `--before-allocator on` applies it on side A
too (from this checkout's `_memory.py` when A's package lacks it), to compare two later versions.

`student`: one DM `image_gradient` on 10 classes x (64 real, 1 synthetic) at 32², the
released-style per-class student (`ld3m_fast.reference.distill_losses.dm_loss_ref`) vs ours.

`compile`: `--compile` (inductor) payback on the embedded default: seconds of the first
(compiling) iteration, steady-state eager and compiled iteration times, iterations to break even.

Every number is CPU time on this machine, with the thread count printed; medians and min-max.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]


def _usage():
    """(user s, system s, minor faults) of this process and its finished children (inductor's
    compile workers, when there are any)."""
    import resource

    r, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + c.ru_utime, r.ru_stime + c.ru_stime, r.ru_minflt + c.ru_minflt


def _keep_freed_memory() -> bool:
    """The CLI's allocator setting; from this checkout's file when the imported package lacks it."""
    try:
        from ld3m_fast._memory import keep_freed_memory
    except ImportError:
        import importlib.util

        spec = importlib.util.spec_from_file_location("_ld3m_memory", HERE / "ld3m_fast" / "_memory.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        keep_freed_memory = module.keep_freed_memory
    return keep_freed_memory()


def _worker(args) -> None:
    """One process: warm-up + timed iterations of the embedded default; JSON on stdout."""
    import torch

    if args.allocator == "on":
        _keep_freed_memory()
    torch.set_num_threads(1)
    import ld3m_fast
    from ld3m_fast.distill import DistillConfig, Distiller, build_setup, resolve_defaults

    extra = json.loads(args.config) if args.config else {}
    config = resolve_defaults(DistillConfig(progress=False, threads=1, **extra))
    setup = build_setup(config)
    rows = []
    with tempfile.TemporaryDirectory() as run_dir:
        distiller = Distiller(setup, run_dir)
        for i in range(args.iterations + args.warmup):
            u0, s0, f0 = _usage()
            wall = time.perf_counter()
            record = distiller.step()
            u1, s1, f1 = _usage()
            rows.append({"warmup": i < args.warmup, "cpu_s": (u1 - u0) + (s1 - s0), "user_s": u1 - u0,
                         "sys_s": s1 - s0, "minflt": f1 - f0, "wall_s": time.perf_counter() - wall,
                         "loss": record["loss"]})
    import resource

    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"package": str(Path(ld3m_fast.__file__).parent), "threads": torch.get_num_threads(),
                      "allocator": args.allocator, "peak_rss_mib": peak_mib, "rows": rows}))


def _spawn(pythonpath: str | None, allocator: str, iterations: int, warmup: int, config: str | None) -> dict:
    # One compile thread: inductor then compiles in this process, so its CPU time is counted.
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TORCHINDUCTOR_COMPILE_THREADS="1")
    if pythonpath:
        env["PYTHONPATH"] = pythonpath + os.pathsep + env.get("PYTHONPATH", "")
    command = [sys.executable, __file__, "worker", "--allocator", allocator, "--iterations", str(iterations),
               "--warmup", str(warmup)]
    if config:
        command += ["--config", config]
    out = subprocess.run(command, env=env, capture_output=True, text=True, cwd="/tmp")
    if out.returncode:
        raise SystemExit(f"worker failed ({command}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _summary(values) -> str:
    return f"{statistics.median(values):.3f} [{min(values):.3f}-{max(values):.3f}]"


def _iteration(args) -> None:
    from ld3m_fast._host import cpu_model

    sides = {"A (before)": (args.before, args.before_allocator), "B (after)": (args.after, args.allocator)}
    results = {name: [] for name in sides}
    for pair in range(args.pairs):
        for name, (path, allocator) in sides.items():
            results[name].append(_spawn(path, allocator, args.iterations, args.warmup, args.config))
            rows = [r for r in results[name][-1]["rows"] if not r["warmup"]]
            print(f"pair {pair + 1} {name}: cpu {statistics.median(r['cpu_s'] for r in rows):.3f} s/it "
                  f"(package {results[name][-1]['package']})", flush=True)
    print(f"\nEmbedded default iteration, {cpu_model()}, 1 thread, {args.pairs} interleaved pairs x "
          f"{args.iterations} iterations after {args.warmup} warm-up; median [min-max] per iteration")
    report = {}
    for name, runs in results.items():
        rows = [r for run in runs for r in run["rows"] if not r["warmup"]]
        report[name] = {key: [r[key] for r in rows] for key in ("cpu_s", "user_s", "sys_s", "minflt", "wall_s")}
        report[name]["package"] = runs[0]["package"]
        report[name]["allocator_keeps_memory"] = runs[0]["allocator"] == "on"
        report[name]["peak_rss_mib"] = max(run.get("peak_rss_mib", 0.0) for run in runs)
        print(f"  {name:20s} cpu {_summary(report[name]['cpu_s'])} s  user {_summary(report[name]['user_s'])} s  "
              f"sys {_summary(report[name]['sys_s'])} s  minflt {statistics.median(report[name]['minflt']):.0f} "
              f"[{min(report[name]['minflt'])}-{max(report[name]['minflt'])}]  "
              f"peak RSS {report[name]['peak_rss_mib']:.0f} MiB  ({report[name]['package']}, "
              f"allocator setting {'on' if report[name]['allocator_keeps_memory'] else 'off'})")
    a, b = (statistics.median(report[n]["cpu_s"]) for n in results)
    # Per-pair ratios (same moment, same machine load): the spread says how stable the ratio is.
    pairs = [statistics.median(r["cpu_s"] for r in ra["rows"] if not r["warmup"])
             / statistics.median(r["cpu_s"] for r in rb["rows"] if not r["warmup"])
             for ra, rb in zip(*results.values())]
    print(f"  speed-up (CPU time, medians): {a / b:.2f}x; per pair {_summary(pairs)}")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": cpu_model(), "threads": 1, "pairs": args.pairs,
                                               "iterations": args.iterations, "results": report,
                                               "pair_ratios": pairs}, indent=2) + "\n")


def _student(args) -> None:
    import torch

    from ld3m_fast._host import cpu_model
    from ld3m_fast._memory import keep_freed_memory
    from ld3m_fast.distill.algorithms import DM, NetworkSpec, RealData, StepContext
    from ld3m_fast.dsa import DSA
    from ld3m_fast.reference.distill_losses import dm_loss_ref

    keep_freed_memory()
    torch.set_num_threads(1)
    spec = NetworkSpec(num_classes=10, res=32)
    g = torch.Generator().manual_seed(0)
    real_images = torch.randint(0, 256, (10 * 100, 3, 32, 32), dtype=torch.uint8, generator=g)
    real = RealData(real_images, torch.arange(10).repeat_interleave(100), 10)
    syn = torch.randn(10, 3, 32, 32, generator=g)
    labels = torch.arange(10)
    dm = DM(spec, batch_real=64)

    def ctx():
        return StepContext(real=real, generator=torch.Generator().manual_seed(1), dsa=DSA(),
                           dsa_generator=torch.Generator().manual_seed(2))

    def released():
        c = ctx()
        net = spec.build_seeded(c.generator)
        x = syn.clone().requires_grad_(True)
        loss = dm_loss_ref(net, x, labels, lambda k: real.sample(k, 64, c.generator, "cpu"),
                           dsa=c.dsa, dsa_generator=c.dsa_generator)
        loss.backward()

    def ours():
        dm.image_gradient(syn, labels, ctx())

    times = {"released-style per-class student": [], "ours": []}
    for _ in range(args.repeats):
        for name, fn in (("released-style per-class student", released), ("ours", ours)):
            started = time.process_time()
            fn()
            times[name].append(time.process_time() - started)
    print(f"DM image gradient, 10 classes x (64 real + 1 syn), 32², ConvNet-3, {cpu_model()}, "
          f"{torch.get_num_threads()} thread; CPU s, median [min-max] of {args.repeats} interleaved")
    for name, values in times.items():
        print(f"  {name:34s} {_summary(values)}")


def _compile(args) -> None:
    from ld3m_fast._host import cpu_model

    runs = {}
    for name, config in (("eager", None), ("compiled", json.dumps({"compile": True}))):
        runs[name] = _spawn(None, args.allocator, args.iterations, 1, config)
    eager = statistics.median(r["cpu_s"] for r in runs["eager"]["rows"] if not r["warmup"])
    eager_first = runs["eager"]["rows"][0]["cpu_s"]
    first = runs["compiled"]["rows"][0]["cpu_s"]
    first_wall = runs["compiled"]["rows"][0]["wall_s"]
    steady = [r["cpu_s"] for r in runs["compiled"]["rows"] if not r["warmup"]]
    compiled = statistics.median(steady)
    cost = first - eager_first  # both first iterations pay the one-off warm-up; compile is the rest
    print(f"--compile (inductor) payback, embedded default, {cpu_model()}, 1 thread, 1 compile thread, CPU s")
    print(f"  eager: first iteration {eager_first:.2f}, then {eager:.3f}/it")
    print(f"  compiled: first iteration {first:.2f} (wall {first_wall:.1f} s), then {compiled:.3f}/it "
          f"[{min(steady):.3f}-{max(steady):.3f}] = {eager / compiled:.2f}x eager")
    saving = eager - compiled
    print(f"  compile cost ~{cost:.1f} CPU s; break-even after "
          + (f"{cost / saving:.0f} iterations" if saving > 0 else "never (compiled is not faster)"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    worker = sub.add_parser("worker")
    worker.add_argument("--allocator", choices=("on", "off"), default="on")
    worker.add_argument("--iterations", type=int, default=4)
    worker.add_argument("--warmup", type=int, default=1)
    worker.add_argument("--config", default=None, help="JSON of DistillConfig overrides")
    iteration = sub.add_parser("iteration")
    iteration.add_argument("--before", required=True, help="package root of the 'before' side")
    iteration.add_argument("--after", default=None,
                           help="package root of the 'after' side (default: this checkout)")
    iteration.add_argument("--pairs", type=int, default=5)
    iteration.add_argument("--iterations", type=int, default=4)
    iteration.add_argument("--warmup", type=int, default=1)
    iteration.add_argument("--allocator", choices=("on", "off"), default="on", help="for side B")
    iteration.add_argument("--before-allocator", choices=("on", "off"), default="off",
                           help="for side A (on: compare two versions that both have the setting)")
    iteration.add_argument("--config", default=None, help="JSON of DistillConfig overrides (both sides)")
    iteration.add_argument("--json", default=None, help="also write the results here")
    student = sub.add_parser("student")
    student.add_argument("--repeats", type=int, default=5)
    compiled = sub.add_parser("compile")
    compiled.add_argument("--iterations", type=int, default=6)
    compiled.add_argument("--allocator", choices=("on", "off"), default="on")
    args = parser.parse_args(argv)
    {"worker": _worker, "iteration": _iteration, "student": _student, "compile": _compile}[args.mode](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

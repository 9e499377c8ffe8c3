"""The pipeline benchmark suite: one harness, three parts, one report.

a. simulated at full scale (cin256-v2, 10 classes, CFG 3): peak memory and FLOPs per
   iteration for autograd / released (chunks of 10, full-batch student) / ours
   (recompute, chunks of 10, student micro-batches of 10), DM and MTT, fp32 and bf16;
b. growth of the simulated peak with T, IPC and MTT syn_steps;
c. measured on this machine: seconds per distillation iteration on the embedded prior,
   the released scheme in eager PyTorch (reference ops) vs ours (recompute, fused
   C++ ops, optionally torch.compile), timed in the same process.

Simulations walk the real iteration under fake tensors (`ld3m_fast.planner`), so parts
a and b say nothing about speed and part c says nothing about GPUs. Every row names
what it is and where it was measured.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from ._host import cpu_model
from .planner.plan import plan
from .planner.simulate import IterationSpec, estimate

SETTINGS = [(256, 10, 20), (128, 1, 10), (128, 10, 10)]  # (res, ipc, T)
PLAN_BUDGET = 8 * 2**30  # the target: ours within 8 GiB at the planner's chunk
SCHEMES = {  # name -> spec overrides
    "autograd": dict(grad_mode="autograd", chunk=None, micro_batch=None),
    "released": dict(grad_mode="released", chunk=10, micro_batch=None),
    "ours": dict(grad_mode="recompute", chunk=10, micro_batch=10),
}


def _row(part: str, spec: IterationSpec, scheme: str, result) -> dict:
    return {"part": part, "scheme": scheme, "prior": spec.prior, "res": spec.res, "ipc": spec.ipc,
            "steps": spec.steps, "algorithm": spec.algorithm, "dtype": spec.dtype,
            "syn_steps": spec.syn_steps, "mtt_gradient": spec.mtt_gradient, "chunk": spec.chunk,
            "micro_batch": spec.micro_batch, "peak_gib": result.peak_gib, "tflops": result.tflops,
            "phase_peaks_gib": {k: v / 2**30 for k, v in result.phase_peaks.items()},
            "weights_gib": result.weights_bytes / 2**30, "method": result.method,
            "device": "simulated (fake tensors, CPU dispatch path)"}


def simulated_full_scale(prior: str = "cin256-v2", settings=SETTINGS, plan_chunks=(1, 2, 5, 10),
                         log=print) -> list[dict]:
    """Part a over `settings` [(res, ipc, T)]; `plan_chunks` () skips the planner rows."""
    rows = []
    for res, ipc, steps in settings:
        for algorithm in ("dm", "mtt"):
            base = IterationSpec(prior=prior, res=res, ipc=ipc, steps=steps, algorithm=algorithm)
            for scheme, overrides in SCHEMES.items():
                for dtype in ("fp32", "bf16") if scheme == "ours" else ("fp32",):
                    spec = replace(base, dtype=dtype, **overrides)
                    started = time.perf_counter()
                    rows.append(_row("a", spec, scheme, estimate(spec)))
                    log(f"  a: {res}² ipc {ipc} T={steps} {algorithm} {scheme} {dtype}: "
                        f"{rows[-1]['peak_gib']:.2f} GiB ({time.perf_counter() - started:.0f} s)")
            for dtype in ("fp32", "bf16") if plan_chunks else ():
                spec = replace(base, dtype=dtype, **SCHEMES["ours"])
                _, best = plan(spec, PLAN_BUDGET, chunks=[c for c in plan_chunks if c <= spec.images],
                               dtypes=(dtype,))
                if best is not None:
                    rows.append(_row("a", best.estimate.spec, "ours, planner's chunk (8 GiB)", best.estimate))
                    log(f"  a: {res}² ipc {ipc} T={steps} {algorithm} planned {dtype}: chunk "
                        f"{best.estimate.spec.chunk}, {rows[-1]['peak_gib']:.2f} GiB")
                else:
                    log(f"  a: {res}² ipc {ipc} T={steps} {algorithm} planned {dtype}: nothing fits 8 GiB")
    return rows


def simulated_growth(prior: str = "cin256-v2", syn_steps=(10, 20, 40, 80), log=print) -> list[dict]:
    rows = []
    base = IterationSpec(prior=prior, res=256, ipc=10, steps=20, algorithm="dm")
    growth = [("steps", t, replace(base, steps=t)) for t in (10, 20, 40, 80)]
    growth += [("ipc", n, replace(base, ipc=n)) for n in (1, 10, 50)]
    mtt = replace(base, algorithm="mtt")
    growth += [("syn_steps", n, replace(mtt, syn_steps=n, mtt_gradient=g))
               for g in ("truncated", "full") for n in syn_steps]
    for name, value, spec in growth:
        for scheme in ("released", "ours"):
            if name == "syn_steps" and scheme == "released":
                continue
            spec_s = replace(spec, **SCHEMES[scheme])
            row = _row("b", spec_s, scheme, estimate(spec_s))
            row["varied"] = name
            rows.append(row)
            log(f"  b: {name}={value} {scheme} {spec_s.mtt_gradient if name == 'syn_steps' else ''}: "
                f"{row['peak_gib']:.2f} GiB")
    return rows


def _time_iterations(config, iterations: int, backend: str | None) -> list[float]:
    from .distill import Distiller, build_setup, resolve_defaults

    previous = os.environ.get("LD3M_FAST_BACKEND")
    if backend:
        os.environ["LD3M_FAST_BACKEND"] = backend
    try:
        config = resolve_defaults(config, log=lambda *a: None)
        setup = build_setup(config, log=lambda *a: None)
        with tempfile.TemporaryDirectory() as run_dir:
            distiller = Distiller(setup, run_dir, log=lambda *a: None)
            distiller.step()  # warm-up (and compilation, when asked)
            times = []
            for _ in range(iterations):
                started = time.perf_counter()
                distiller.step()
                times.append(time.perf_counter() - started)
        return times
    finally:
        if backend:
            if previous is None:
                os.environ.pop("LD3M_FAST_BACKEND", None)
            else:
                os.environ["LD3M_FAST_BACKEND"] = previous


def measured_cpu(resolutions=(32, 128), ipc: int = 10, iterations: int = 3,
                 compile_backend: str | None = None, log=print) -> list[dict]:
    """Seconds per iteration on this machine: released (eager, reference ops) vs ours."""
    from .distill import DistillConfig

    rows = []
    for res in resolutions:
        common = dict(res=res, ipc=ipc, iterations=iterations + 1, batch_real=64, progress=False)
        variants = {
            "released (eager, reference ops)": (DistillConfig(grad_mode="released", chunk=10, **common), "reference"),
            "ours (recompute, fused C++ ops"
            + (f", compile {compile_backend})" if compile_backend else ")"):
                (DistillConfig(grad_mode="recompute", compile=bool(compile_backend),
                               compile_backend=compile_backend or "inductor", **common), None),
        }
        timings = {}
        for name, (config, backend) in variants.items():
            timings[name] = _time_iterations(config, iterations, backend)
            log(f"  c: {res}² {name}: median {statistics.median(timings[name]):.2f} s/it")
        baseline = statistics.median(next(iter(timings.values())))
        for name, times in timings.items():
            median = statistics.median(times)
            rows.append({"part": "c", "scheme": name, "res": res, "ipc": ipc, "algorithm": "dm",
                         "steps": 10, "seconds_median": median,
                         "seconds_spread": (max(times) - min(times)) if len(times) > 1 else 0.0,
                         "speedup_vs_released": baseline / median, "iterations_timed": len(times),
                         "device": _cpu_name(), "threads": torch.get_num_threads()})
    return rows


def _cpu_name() -> str:
    return f"CPU: {cpu_model()} ({os.cpu_count()} cores)"


def markdown(rows: list[dict]) -> str:
    """The report: one table per part."""
    out = []
    a = [r for r in rows if r["part"] == "a"]
    if a:
        out += ["### a. Simulated at full scale (cin256-v2 prior, 10 classes, CFG 3; fake tensors)", "",
                "| res | IPC | T | alg | scheme | chunk | dtype | peak GiB | peak phase | TFLOP/iter | vs released peak | vs released FLOPs |",
                "|---:|---:|---:|---|---|---:|---|---:|---|---:|---:|---:|"]
        for r in a:
            ref = next(x for x in a if x["scheme"] == "released" and x["res"] == r["res"]
                       and x["ipc"] == r["ipc"] and x["algorithm"] == r["algorithm"])
            phase = max(r["phase_peaks_gib"], key=r["phase_peaks_gib"].get)
            out.append(f"| {r['res']} | {r['ipc']} | {r['steps']} | {r['algorithm']} | {r['scheme']} | "
                       f"{r['chunk'] or 'all'} | {r['dtype']} | {r['peak_gib']:.2f} | {phase} | {r['tflops']:.1f} | "
                       f"{r['peak_gib'] / ref['peak_gib']:.2f}x | {r['tflops'] / ref['tflops']:.2f}x |")
        out.append("")
    b = [r for r in rows if r["part"] == "b"]
    if b:
        out += ["### b. Growth of the simulated peak (256², DM unless MTT; chunks of 10)", "",
                "| varied | value | scheme | MTT gradient | peak GiB |", "|---|---:|---|---|---:|"]
        for r in b:
            value = r[r["varied"]]
            grad = r["mtt_gradient"] if r["varied"] == "syn_steps" else ""
            out.append(f"| {r['varied']} | {value} | {r['scheme']} | {grad} | {r['peak_gib']:.2f} |")
        out.append("")
    c = [r for r in rows if r["part"] == "c"]
    if c:
        out += [f"### c. Measured: seconds per DM iteration, embedded prior, IPC {c[0]['ipc']}, T=10 "
                f"({c[0]['device']}, {c[0]['threads']} threads)", "",
                "| res | scheme | s/iter (median) | spread | speed-up vs released |", "|---:|---|---:|---:|---:|"]
        for r in c:
            out.append(f"| {r['res']} | {r['scheme']} | {r['seconds_median']:.2f} | {r['seconds_spread']:.2f} | "
                       f"{r['speedup_vs_released']:.2f}x |")
    return "\n".join(out)


def plot(rows: list[dict], path) -> Path | None:
    """Peak memory vs T and IPC (part b) as a PNG; None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    b = [r for r in rows if r["part"] == "b"]
    if not b:
        return None
    panels = [("steps", "T (DDIM steps)"), ("ipc", "IPC"), ("syn_steps", "MTT syn_steps")]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (name, label) in zip(axes, panels):
        series = {}
        for r in b:
            if r["varied"] == name:
                key = r["scheme"] + (f" ({r['mtt_gradient']})" if name == "syn_steps" else "")
                series.setdefault(key, []).append((r[name], r["peak_gib"]))
        for key, points in series.items():
            xs, ys = zip(*sorted(points))
            ax.plot(xs, ys, marker="o", label=key)
        ax.set_xlabel(label)
        ax.set_ylabel("simulated peak (GiB)")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    fig.suptitle("ld3m-fast: simulated peak memory per iteration, cin256-v2 at 256²")
    fig.tight_layout()
    from ._files import atomic_write

    path = Path(path)
    with atomic_write(path, suffix=path.suffix) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return path


def write_json(rows: list[dict], path) -> Path:
    from ._files import write_text_atomic

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "python": platform.python_version(), "machine": _cpu_name()}
    write_text_atomic(path, json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    return path

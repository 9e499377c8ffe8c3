"""CPU benchmark of the fused ops: C++ op vs eager reference vs torch.compile of the reference.

    python benchmarks/bench_kernels.py [--repeats 15] [--threads N] [--out benchmarks/results/bench_kernels.json]

Cases (float32): ld3m_step forward+backward (guidance 3, skip x0) at 100x3x32x32, 100x3x64x64,
200x4x32x32; trajectory_matching_distance forward+backward (grad to the student) and
mtt_truncated_terms (forward; its outputs are constants) at 0.6 M and 11 M parameters.
Each timing is the median over `--repeats` runs after warm-up (compile time excluded), with
the interquartile range as spread; ratios are against the C++ op measured in the same run.
Prints a table and writes JSON (atomically) with the device, versions and thread count.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, installed or not

from ld3m_fast._files import write_json_atomic  # noqa: E402
from ld3m_fast._host import cpu_model  # noqa: E402
from ld3m_fast.ops import backend_report, ld3m_step, mtt_truncated_terms, trajectory_matching_distance  # noqa: E402
from ld3m_fast.reference import (ld3m_step_ref, mtt_truncated_terms_ref,  # noqa: E402
                                 trajectory_matching_distance_ref)

STEP_SHAPES = [(100, 3, 32, 32), (100, 3, 64, 64), (200, 4, 32, 32)]
PARAM_COUNTS = [600_000, 11_000_000]
STEP_SCALARS = dict(a_t=0.3, a_prev=0.55, skip_weight=0.4, skip="x0", guidance=3.0)


def time_it(fn, repeats: int, warmup: int = 3) -> dict:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    quartiles = statistics.quantiles(samples, n=4) if len(samples) > 1 else [samples[0]] * 3
    return {"median_ms": statistics.median(samples), "iqr_ms": quartiles[2] - quartiles[0],
            "min_ms": min(samples), "repeats": repeats}


def step_case(shape, repeats, generator):
    z_t, eps_cond, eps_uncond, anchor = [torch.randn(shape, generator=generator).requires_grad_() for _ in range(4)]
    grad_out = torch.randn(shape, generator=generator)
    inputs = (z_t, eps_cond, eps_uncond, anchor)

    def forward_backward(fn):
        def run():
            out = fn(z_t, eps_cond, anchor, eps_uncond=eps_uncond, **STEP_SCALARS)
            torch.autograd.grad(out, inputs, grad_out)
        return run

    compiled = torch.compile(ld3m_step_ref)
    return {
        "cpp op": time_it(forward_backward(ld3m_step), repeats),
        "eager reference": time_it(forward_backward(ld3m_step_ref), repeats),
        "compiled reference": time_it(forward_backward(compiled), repeats),
    }


def distance_case(n, repeats, generator):
    target = torch.randn(n, generator=generator)
    start = target + torch.randn(n, generator=generator)
    student = (target + 0.5 * torch.randn(n, generator=generator)).requires_grad_()

    def forward_backward(fn):
        return lambda: torch.autograd.grad(fn(student, start, target), student)

    compiled = torch.compile(trajectory_matching_distance_ref)
    return {
        "cpp op": time_it(forward_backward(trajectory_matching_distance), repeats),
        "eager reference": time_it(forward_backward(trajectory_matching_distance_ref), repeats),
        "compiled reference": time_it(forward_backward(compiled), repeats),
    }


def mtt_case(n, repeats, generator):
    target = torch.randn(n, generator=generator)
    start = target + torch.randn(n, generator=generator)
    grad_sum = torch.randn(n, generator=generator)
    alpha = torch.tensor(0.01)
    compiled = torch.compile(mtt_truncated_terms_ref)
    return {
        "cpp op": time_it(lambda: mtt_truncated_terms(start, grad_sum, target, alpha), repeats),
        "eager reference": time_it(lambda: mtt_truncated_terms_ref(start, grad_sum, target, alpha), repeats),
        "compiled reference": time_it(lambda: compiled(start, grad_sum, target, alpha), repeats),
    }


def print_table(rows: list[dict], header: str) -> None:
    print(header)
    title = f"{'case':<44} {'impl':<20} {'median ms':>10} {'IQR ms':>8} {'x vs cpp op':>12}"
    print(title)
    print("-" * len(title))
    for row in rows:
        print(f"{row['case']:<44} {row['impl']:<20} {row['median_ms']:>10.3f} {row['iqr_ms']:>8.3f} "
              f"{row['ratio_vs_cpp']:>11.2f}x")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads for the run (default: torch's own choice)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "bench_kernels.json")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    os.environ["LD3M_FAST_BACKEND"] = "cpp"  # the op must run the C++ kernel, never fall back silently
    report = backend_report()
    device = {"device": "cpu", "cpu_model": cpu_model(), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "python": platform.python_version(),
              "cpp_extension": report["cpp_extension"]}
    generator = torch.Generator().manual_seed(0)
    cases = []
    for shape in STEP_SHAPES:
        cases.append((f"ld3m_step fwd+bwd {'x'.join(map(str, shape))}", step_case(shape, args.repeats, generator)))
    for n in PARAM_COUNTS:
        cases.append((f"tm_distance fwd+bwd {n / 1e6:g}M", distance_case(n, args.repeats, generator)))
    for n in PARAM_COUNTS:
        cases.append((f"mtt_truncated_terms {n / 1e6:g}M", mtt_case(n, args.repeats, generator)))

    # The 1-minute load average says whether other processes shared the cores (a shared
    # 2-core machine stalls multi-threaded regions and inflates every median).
    device["load_average_1m"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    rows = []
    for case, timings in cases:
        baseline = timings["cpp op"]["median_ms"]
        for impl, timing in timings.items():
            rows.append({"case": case, "impl": impl, **timing, "ratio_vs_cpp": timing["median_ms"] / baseline})
    header = (f"CPU: {device['cpu_model']} | torch {device['torch']} | {device['threads']} threads | float32 | "
              f"median of {args.repeats} | load avg {device['load_average_1m']} "
              "(ratio = impl time / C++ op time, same run)")
    print_table(rows, header)
    write_json_atomic(args.out, {"device": device, "rows": rows,
                                 "created": time.strftime("%Y-%m-%dT%H:%M:%S")})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`ld3m-fast bench`: the pipeline benchmark report (markdown on stdout, JSON, PNG)."""
from __future__ import annotations

from pathlib import Path

PARTS = ("a", "b", "c")


def add_arguments(parser):
    parser.add_argument("--parts", default="abc", help="which parts to run: any of a, b, c (default abc)")
    parser.add_argument("--prior", default="cin256-v2", help="prior simulated in parts a and b")
    parser.add_argument("--settings", default="256:10:20,128:1:10,128:10:10",
                        help="part a: comma-separated res:ipc:T settings")
    parser.add_argument("--budgets", default="8,24,80",
                        help="part a: memory budgets in GiB for the equal-budget rows ('' skips them)")
    parser.add_argument("--algorithms", default="dm,mtt", help="part a: distillation algorithms")
    parser.add_argument("--syn-steps", default="10,20,40,80", help="part b: MTT syn_steps values")
    parser.add_argument("--resolutions", default="32,128", help="part c: image sides to time")
    parser.add_argument("--iterations", type=int, default=3, help="part c: timed iterations per variant")
    parser.add_argument("--compile-backend", default=None,
                        help="part c: torch.compile backend for ours (e.g. inductor); default eager")
    parser.add_argument("--out", default="benchmarks/results", help="folder for bench_pipeline.json/.png/.md")


def run(args) -> int:
    from .. import bench
    from ..errors import LD3MError
    from .._files import write_text_atomic

    unknown = set(args.parts) - set(PARTS)
    if unknown:
        raise LD3MError(f"unknown --parts {''.join(sorted(unknown))}; choose from a, b, c")
    rows = []
    if "a" in args.parts:
        settings = [tuple(int(x) for x in item.split(":")) for item in args.settings.split(",") if item]
        budgets = tuple(float(b) for b in args.budgets.split(",") if b.strip())
        algorithms = tuple(a.strip() for a in args.algorithms.split(",") if a.strip())
        rows += bench.simulated_full_scale(args.prior, settings=settings, budgets_gib=budgets,
                                           algorithms=algorithms)
    if "b" in args.parts:
        syn_steps = tuple(int(n) for n in args.syn_steps.split(",") if n.strip())
        rows += bench.simulated_growth(args.prior, syn_steps=syn_steps)
    if "c" in args.parts:
        resolutions = tuple(int(r) for r in args.resolutions.split(",") if r.strip())
        rows += bench.measured_cpu(resolutions, iterations=args.iterations,
                                   compile_backend=args.compile_backend)
    out = Path(args.out)
    report = bench.markdown(rows)
    print(report)
    print(f"JSON: {bench.write_json(rows, out / 'bench_pipeline.json')}")
    write_text_atomic(out / "bench_pipeline.md", report + "\n")
    png = bench.plot(rows, out / "bench_pipeline.png")
    print(f"plot: {png}" if png else "plot: skipped (needs part b and matplotlib)")
    return 0

"""`ld3m-fast bench`: the pipeline benchmark report (markdown on stdout, JSON, PNG)."""
from __future__ import annotations

import logging

from .settings import argument_type

logger = logging.getLogger(__name__)

PARTS = ("a", "b", "c")


def _numbers(kind, bounds: dict, parts: int = 1):
    """An argparse type for a comma-separated list of `kind` within `bounds` (`parts` > 1: each
    item is `parts` numbers joined by ':', as '256:10:20')."""
    from ..bounds import Bounds

    check = Bounds(**bounds)
    numbers = f"{'integers' if kind is int else 'numbers'} {check.describe()}"
    expected = f"comma-separated {numbers}" if parts == 1 else f"comma-separated items of {parts} {numbers} joined by ':'"

    def parse(text: str):
        items = []
        for item in (i.strip() for i in text.split(",") if i.strip()):
            try:
                values = tuple(kind(v) for v in item.split(":"))
            except ValueError:
                values = ()
            if len(values) != parts or any(check.problem(v) for v in values):
                raise ValueError(f"expected {expected}, got {item!r}")
            items.append(values if parts > 1 else values[0])
        return tuple(items)

    return argument_type(parse)


def add_arguments(parser):
    from ..bounds import COUNT

    parser.add_argument("--parts", default="abc", help="which parts to run: any of a, b, c (default abc)")
    parser.add_argument("--prior", default="cin256-v2", help="prior simulated in parts a and b")
    parser.add_argument("--settings", type=_numbers(int, {"minimum": 1}, parts=3), default="256:10:20,128:1:10,128:10:10",
                        help="part a: comma-separated res:ipc:T settings")
    parser.add_argument("--budgets", type=_numbers(float, {"above": 0}), default="8,24,80",
                        help="part a: memory budgets in GiB for the equal-budget rows ('' skips them)")
    parser.add_argument("--algorithms", default="dm,mtt", help="part a: distillation algorithms")
    parser.add_argument("--syn-steps", type=_numbers(int, {"minimum": 1}), default="10,20,40,80",
                        help="part b: MTT syn_steps values")
    parser.add_argument("--resolutions", type=_numbers(int, {"minimum": 1}), default="32,128",
                        help="part c: image sides to time")
    parser.add_argument("--iterations", type=COUNT, default=3, help="part c: timed iterations per variant")
    parser.add_argument("--compile-backend", default=None,
                        help="part c: torch.compile backend for ours (e.g. inductor); default eager")
    parser.add_argument("--out", default="benchmarks/results", help="folder for bench_pipeline.json/.png/.md")


def run(args) -> int:
    from .. import bench
    from .._files import check_writable_folder, write_text_atomic
    from ..choices import ALGORITHMS
    from ..errors import LD3MError

    unknown = set(args.parts) - set(PARTS)
    if unknown:
        raise LD3MError(f"unknown --parts {''.join(sorted(unknown))}; choose from a, b, c")
    algorithms = tuple(a.strip() for a in args.algorithms.split(",") if a.strip())
    unknown = [a for a in algorithms if a not in ALGORITHMS]
    if unknown or not algorithms:
        raise LD3MError(f"unknown --algorithms {args.algorithms!r}; choose from {', '.join(ALGORITHMS)}")
    out = check_writable_folder(args.out, "--out")
    rows = []
    if "a" in args.parts:
        rows += bench.simulated_full_scale(args.prior, settings=list(args.settings), budgets_gib=args.budgets,
                                           algorithms=algorithms)
    if "b" in args.parts:
        rows += bench.simulated_growth(args.prior, syn_steps=args.syn_steps)
    if "c" in args.parts:
        rows += bench.measured_cpu(args.resolutions, iterations=args.iterations,
                                   compile_backend=args.compile_backend)
    report = bench.markdown(rows)
    print(report)
    logger.info(f"JSON: {bench.write_json(rows, out / 'bench_pipeline.json')}")
    write_text_atomic(out / "bench_pipeline.md", report + "\n")
    png = bench.plot(rows, out / "bench_pipeline.png")
    logger.info(f"plot: {png}" if png else "plot: skipped (needs part b and matplotlib)")
    return 0

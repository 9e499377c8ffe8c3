"""Pipeline benchmark suite: the same harness as `ld3m-fast bench` (see ld3m_fast/bench.py).

    python benchmarks/bench_pipeline.py [--parts abc] [--prior cin256-v2] [--out benchmarks/results]

Parts a and b simulate one distillation iteration of the real code path under fake
tensors (peak memory, FLOPs); part c times iterations on this machine. Results go to
bench_pipeline.{md,json,png} in --out.
"""
import argparse
import sys

from ld3m_fast.cli import bench


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bench.add_arguments(parser)
    return bench.run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

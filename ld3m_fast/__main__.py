"""`python -m ld3m_fast COMMAND ...`: the `ld3m-fast` CLI, for launchers that take a module.

    torchrun --nproc-per-node 2 -m ld3m_fast distill ...      (docs/distributed.md)
"""
import sys

from ld3m_fast.cli.main import main

if __name__ == "__main__":
    sys.exit(main())

"""`ld3m-fast <command>`: subcommands behind one console-script entry point.

User errors (`LD3MError`) print one line on stderr and exit with code 2;
anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from ..errors import LD3MError

# name -> (module, help). Each module exposes add_arguments(parser) and run(args) -> int.
COMMANDS = {
    "info": ("ld3m_fast.cli.info", "versions, devices and the backend each op will use"),
    "convert": ("ld3m_fast.cli.convert", "convert a CompVis cin256-v2 .ckpt into a prior folder"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ld3m-fast",
        description="Dataset distillation through a frozen latent diffusion model (LD3M), fast.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        sub = commands.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(sub)
        sub.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except LD3MError as error:
        print(f"ld3m-fast {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ld3m-fast {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

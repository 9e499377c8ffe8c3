"""`ld3m-fast <command>`: subcommands behind one console-script entry point.

User errors (`LD3MError`, and malformed flags) print one line on stderr and exit
with code 2, as does a full disk or a read-only filesystem met where no command said more;
a run stopped by SIGINT/SIGTERM exits with 128 + the signal number after saying how to
resume; anything else is a bug and keeps its traceback.

Messages: for the length of one `main()` call, one `ConsoleHandler` sits on the `ld3m_fast`
logger (INFO and DEBUG as plain lines on stdout, warnings as `ld3m-fast: warning: ...` on stderr);
`--quiet` keeps only warnings, `--verbose` adds DEBUG. What a command produces (a table, a
listing, a report) is printed on stdout by the command itself; the error line above is printed
by `distributed.report`, whatever the level.

Under torchrun (`python -m ld3m_fast`, `ld3m_fast/__main__.py`) every rank runs this; an
error raised alike on every rank is printed by rank 0 only, a failed collective by each
rank that sees it (`ld3m_fast.distributed.reports`), and the process group is left at exit.
The line goes through `distributed.report`: said once per command (the heartbeat's thread
may end the process with its own line first) and copied into torchrun's error file.
"""
from __future__ import annotations

import argparse
import errno
import importlib
import logging
import os
import sys
from contextlib import contextmanager

from .._threads import set_wait_policy
from ..errors import LD3MError, one_line

set_wait_policy()  # before anything imports torch (and its OpenMP runtime)

# name -> (module, help). Each module exposes add_arguments(parser) and run(args) -> int.
COMMANDS = {
    "distill": ("ld3m_fast.cli.distill", "distill a dataset into LD3M latents (DM, DC or MTT)"),
    "buffer": ("ld3m_fast.cli.buffer", "train expert trajectories for MTT"),
    "prune": ("ld3m_fast.cli.prune", "score every real image for pruning (the authors' follow-up); write the losses"),
    "eval": ("ld3m_fast.cli.evaluate", "train fresh networks on a distilled set, test on real data"),
    "prior": ("ld3m_fast.cli.prior", "train a small prior (as the embedded default was), or import a diffusers pipeline folder"),
    "plan": ("ld3m_fast.cli.plan", "peak memory and FLOPs per iteration; pick chunk and dtype for a budget"),
    "bench": ("ld3m_fast.cli.bench", "benchmark report: simulated full-scale memory/FLOPs, measured CPU speed"),
    "convert": ("ld3m_fast.cli.convert", "convert a CompVis cin256-v2 .ckpt into a prior folder"),
    "info": ("ld3m_fast.cli.info", "versions, devices and the backend each op will use"),
    "presets": ("ld3m_fast.cli.presets", "the paper's settings as named presets, each value with its source"),
}


# What the machine, not the program, ran out of: a full disk, a quota, a read-only filesystem.
RESOURCE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a malformed command line is one line on stderr and exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


class ConsoleHandler(logging.Handler):
    """The command line's handler: INFO and DEBUG as plain lines on stdout, WARNING and above on
    stderr as `ld3m-fast: warning: message`. The streams are looked up for every record, so output
    follows a replaced `sys.stdout` / `sys.stderr` (pytest's capsys, a caller's redirect)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
            if record.levelno >= logging.WARNING:
                stream, text = sys.stderr, f"ld3m-fast: {record.levelname.lower()}: {text}"
            else:
                stream = sys.stdout
            stream.write(text + "\n")
            stream.flush()
        except Exception:  # noqa: BLE001 (logging's own policy: a failed message never stops the program)
            self.handleError(record)


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """--quiet / --verbose: how much of the `ld3m_fast` logger's output a command shows."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-q", "--quiet", action="store_true",
                       help="say only warnings and errors (what the command produces is still printed)")
    group.add_argument("-v", "--verbose", action="store_true", help="say more: debug messages too")


def _leaf_parsers(parser: argparse.ArgumentParser):
    """`parser`, or the parsers of its sub-actions (`prior train`, `prior import`), recursively."""
    nested = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    if not nested:
        yield parser
    for action in nested:
        for sub in dict.fromkeys(action.choices.values()):  # aliases map to the same parser
            yield from _leaf_parsers(sub)


@contextmanager
def console_logging(args: argparse.Namespace, *, rank: int = 0):
    """One `ConsoleHandler` on the `ld3m_fast` logger while inside, its level from --quiet /
    --verbose; handler and level are restored afterwards (main runs many times in one process
    under the tests). Ranks other than 0 of a torchrun job say warnings only (as rank 0 says
    the rest for all), unless --verbose."""
    package = logging.getLogger("ld3m_fast")
    verbose, quiet = getattr(args, "verbose", False), getattr(args, "quiet", False)
    handler = ConsoleHandler(logging.WARNING if rank != 0 and not verbose else logging.NOTSET)
    previous = package.level
    package.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)
    package.addHandler(handler)
    try:
        yield handler
    finally:
        package.removeHandler(handler)
        package.setLevel(previous)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="ld3m-fast",
        description="Dataset distillation through a frozen latent diffusion model (LD3M), fast.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        sub = commands.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(sub)
        for leaf in _leaf_parsers(sub):
            add_output_arguments(leaf)
        sub.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .._memory import keep_freed_memory

    parser = build_parser()
    args = parser.parse_args(argv)
    keep_freed_memory()  # reuse freed large blocks: no page-fault churn (see ld3m_fast/_memory.py)
    from .. import distributed

    action = getattr(args, "prior_command", None)  # `ld3m-fast prior train: error: ...`, as argparse names it
    distributed.name_program(" ".join(filter(None, ("ld3m-fast", args.command, action))))
    rank = int(os.environ.get("RANK", "0")) if distributed.launched_by_torchrun() else 0
    with console_logging(args, rank=rank):  # removed again however the command ends
        try:
            return int(args._run(args) or 0)
        except LD3MError as error:
            if distributed.reports(error):
                distributed.report(str(error))
            return getattr(error, "exit_code", 2)
        except OSError as error:
            if error.errno not in RESOURCE_ERRORS:
                raise
            # A full disk or a read-only filesystem where no caller said more: still one line (every
            # write is atomic, so what was written before is whole).
            where = f" {error.filename!r}" if error.filename else ""
            distributed.report(f"cannot write{where} ({error.strerror or error}); free space or choose a "
                               "writable place")
            return 2
        except KeyboardInterrupt:
            distributed.report("interrupted; files already written are complete (every write is atomic)")
            return 130
        finally:
            distributed.shutdown()


if __name__ == "__main__":
    sys.exit(main())

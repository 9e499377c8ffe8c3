"""`ld3m-fast distill`: distil a data set through a frozen LDM prior into a run folder.

Every flag is derived from `ld3m_fast.distill.config.DistillConfig` (one field, one
flag; its help, type and default come from the field; `ld3m_fast.cli.settings`). Settings come from, in
increasing priority: the field defaults, `--preset NAME` (`ld3m-fast presets` lists
them; a `preset` key in the file works too), `--config run.toml` (keys = field names,
with '-' or '_'), and flags given on the command line. `--resume RUN_DIR` continues
a run from its checkpoint; only the settings marked resumable may change then.

Example run.toml:

    data = "fashion-mnist"
    prior = "priors/tiny"
    algorithm = "mtt"
    buffer = "buffers/fmnist32"
    ipc = 10
    mtt-gradient = "truncated"
    iterations = 5000

An unknown key or a value of the wrong type is an error that names it (exit code 2).
"""
from __future__ import annotations

import argparse

from ..bounds import COUNT
from .settings import add_setting_arguments, config_from_args, given_settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_setting_arguments(parser)
    parser.add_argument("--resume", type=str, default=None, metavar="RUN_DIR",
                        help="continue the run in RUN_DIR from its checkpoint")


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=COUNT, default=None,
                        help="CPU threads for torch, at most the cores this process may use (default: the "
                             "cores idle at start, see ld3m_fast._threads)")


def apply_threads(args) -> None:
    """Set torch's CPU thread count from --threads (refused above the usable cores), or the
    default policy."""
    from .._threads import apply_threads as apply, check_threads

    threads = getattr(args, "threads", None)
    if threads is not None:
        check_threads(threads)
    apply(threads if threads is not None else shared_default_threads())


def shared_default_threads() -> int:
    """The idle cores, shared by the processes torchrun started on this machine."""
    from .._threads import default_threads
    from ..distributed import processes_per_node

    return max(1, default_threads() // processes_per_node())


def new_run_config(args):
    """The settings of a new run (`settings.config_from_args`), with the thread count chosen."""
    threads = {}
    if getattr(args, "threads", None) is None and given_settings(args).get("threads") is None:
        threads["threads"] = shared_default_threads()
    return config_from_args(args, **threads)


def run(args) -> int:
    from ..distill.config import DistillConfig
    from ..distill.run import resume_run, start_run

    if args.resume:
        # The recorded config holds the resolved values (a preset's too); its name stays as provenance.
        from ..presets import get_preset

        settings = given_settings(args)
        where = f"config file {args.config}" if args.config else "the settings"
        if settings.get("preset") is not None:
            get_preset(settings["preset"])  # an unknown name: the one line that lists the known ones
        DistillConfig.from_dict({**DistillConfig().to_dict(), **settings}, where=where)
        resume_run(args.resume, settings)
        return 0
    start_run(new_run_config(args))
    return 0

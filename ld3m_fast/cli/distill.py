"""`ld3m-fast distill`: distil a data set through a frozen LDM prior into a run folder.

Every flag is derived from `ld3m_fast.distill.config.DistillConfig` (one field, one
flag; its help, type and default come from the field). Settings come from, in
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
import tomllib
import typing
from pathlib import Path

from ..errors import LD3MError


def _flag(field) -> str:
    return field.metadata["flag"] or "--" + field.name.replace("_", "-")


def _parser_for(hint):
    """text -> value for a flag of type `hint` (the first non-None type of a union)."""
    kinds = [t for t in typing.get_args(hint) or (hint,) if t is not type(None)]
    kind = kinds[0]

    def parse(text: str):
        try:
            return kind(text)
        except ValueError:
            word = {int: "an integer", float: "a number"}.get(kind, kind.__name__)
            raise argparse.ArgumentTypeError(f"expected {word}, got {text!r}") from None

    return parse


def _wrap(parse):
    def wrapped(text: str):
        try:
            return parse(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return wrapped


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..distill.config import DistillConfig

    hints = DistillConfig.types()
    # Every default is None here so that "given on the command line" can be told apart
    # from "left at its default" (flags win over the config file).
    for field in DistillConfig.settings():
        meta, default = field.metadata, field.default
        text = meta["help"]
        if meta["choices"]:
            text += f" ({' | '.join(meta['choices'])})"
        if hints[field.name] is bool:
            parser.add_argument(_flag(field), dest=field.name, action="store_const", const=not default,
                                default=None, help=text)
            continue
        if default is not None:
            text += f" (default: {default})"
        parse = _wrap(meta["parse"]) if meta["parse"] else _parser_for(hints[field.name])
        parser.add_argument(_flag(field), dest=field.name, type=parse, default=None, help=text)
    parser.add_argument("--config", type=str, default=None, help="TOML file of settings (flags win)")
    parser.add_argument("--resume", type=str, default=None, metavar="RUN_DIR",
                        help="continue the run in RUN_DIR from its checkpoint")


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: the cores idle at start, see ld3m_fast._threads)")


def apply_threads(args) -> None:
    """Set torch's CPU thread count from --threads, or the default policy."""
    from .._threads import apply_threads as apply, default_threads
    from ..distributed import processes_per_node

    threads = getattr(args, "threads", None)
    if threads is not None and threads < 1:
        raise LD3MError(f"--threads must be >= 1, got {threads}")
    apply(threads if threads is not None else max(1, default_threads() // processes_per_node()))


def read_config_file(path) -> dict:
    """Settings from a TOML file, keys normalised to field names; unknown keys and values of
    the wrong type are errors (even where a flag overrides them: the file itself is wrong)."""
    from ..distill.config import DistillConfig, coerce

    path = Path(path)
    if not path.is_file():
        raise LD3MError(f"config file {path} does not exist")
    try:
        raw = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise LD3MError(f"cannot parse config file {path}: {error}") from None
    fields = {f.name: f for f in DistillConfig.settings()}
    values = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name not in fields or not fields[name].metadata["in_file"]:
            raise LD3MError(f"unknown key {key!r} in config file {path}")
        values[name] = coerce(name, value, DistillConfig.types()[name], f"config file {path}")
    return values


def explicit_settings(args) -> dict:
    """The settings given as flags on the command line."""
    from ..distill.config import DistillConfig

    return {name: getattr(args, name) for name in DistillConfig.field_names()
            if getattr(args, name, None) is not None}


def new_run_config(args):
    """The settings of a new run: field defaults < --preset < --config file < flags.

    A preset may be named by the flag or by the file's `preset` key; its name is recorded.
    """
    from ..distill.config import DistillConfig
    from ..presets import with_preset

    settings = read_config_file(args.config) if args.config else {}
    where = f"config file {args.config}" if args.config else "the settings"
    settings.update(explicit_settings(args))
    settings = with_preset(settings)
    if settings.get("threads") is None:
        from .._threads import default_threads
        from ..distributed import processes_per_node

        # The idle cores, shared by the processes torchrun started on this machine.
        settings["threads"] = max(1, default_threads() // processes_per_node())
    return DistillConfig.from_dict({**DistillConfig().to_dict(), **settings}, where=where)


def run(args) -> int:
    from ..distill.config import DistillConfig
    from ..distill.run import resume_run, start_run

    if args.resume:
        # The recorded config holds the resolved values (a preset's too); its name stays as provenance.
        from ..presets import get_preset

        settings = read_config_file(args.config) if args.config else {}
        settings.update(explicit_settings(args))
        where = f"config file {args.config}" if args.config else "the settings"
        if settings.get("preset") is not None:
            get_preset(settings["preset"])  # an unknown name: the one line that lists the known ones
        DistillConfig.from_dict({**DistillConfig().to_dict(), **settings}, where=where)
        resume_run(args.resume, settings)
        return 0
    start_run(new_run_config(args))
    return 0

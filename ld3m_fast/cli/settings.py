"""Command-line flags and config files from the one declaration of a run (`DistillConfig`).

Every `DistillConfig` field is one flag (its help, type, choices and default come from the
field) and one `--config run.toml` key. `ld3m-fast distill` takes them all; `ld3m-fast plan`
takes the ones a plan depends on (`PLAN_FIELDS`), and its config files may hold any run key.
Settings come from, in increasing priority: the field defaults, `--preset NAME`, `--config
FILE`, and the flags given on the command line.
"""
from __future__ import annotations

import argparse
import tomllib
import typing
from pathlib import Path

from ..errors import LD3MError


def flag_name(field) -> str:
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


def argument_type(parse):
    """`parse` as an argparse type whose ValueError message is the one-line usage error
    (argparse itself would only say 'invalid value')."""
    def wrapped(text: str):
        try:
            return parse(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    wrapped.__name__ = getattr(parse, "__name__", "value")
    return wrapped


def add_setting_arguments(parser: argparse.ArgumentParser, names=None) -> None:
    """One flag per `DistillConfig` field (of `names`, default all), plus --config."""
    from ..distill.config import DistillConfig

    hints = DistillConfig.types()
    # Every default is None here so that "given on the command line" can be told apart
    # from "left at its default" (flags win over the config file).
    for field in DistillConfig.settings():
        if names is not None and field.name not in names:
            continue
        meta, default = field.metadata, field.default
        text = meta["help"]
        if meta["choices"]:
            text += f" ({' | '.join(meta['choices'])})"
        if hints[field.name] is bool:
            parser.add_argument(flag_name(field), dest=field.name, action="store_const", const=not default,
                                default=None, help=text)
            continue
        if default is not None:
            text += f" (default: {default})"
        parse = argument_type(meta["parse"]) if meta["parse"] else _parser_for(hints[field.name])
        parser.add_argument(flag_name(field), dest=field.name, type=parse, default=None, help=text)
    parser.add_argument("--config", type=str, default=None, help="TOML file of settings (flags win)")


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


def given_settings(args) -> dict:
    """The settings of the command line: --config file < flags (no preset applied yet)."""
    settings = read_config_file(args.config) if args.config else {}
    settings.update(explicit_settings(args))
    return settings


def config_from_args(args, *, preset_needs=None, **overrides):
    """The settings of a new run or plan: field defaults < --preset < --config file < flags.

    A preset may be named by the flag or by the file's `preset` key; its name is recorded.
    preset_needs: which of the preset's required settings must be given (default: all)."""
    from ..distill.config import DistillConfig
    from ..presets import with_preset

    where = f"config file {args.config}" if args.config else "the settings"
    settings = with_preset(given_settings(args), needs=preset_needs)
    settings.update(overrides)
    return DistillConfig.from_dict({**DistillConfig().to_dict(), **settings}, where=where)


__all__ = ["add_setting_arguments", "argument_type", "config_from_args", "explicit_settings", "flag_name", "given_settings",
           "read_config_file"]

"""`ld3m-fast presets [NAME]`: the named settings, and where each value comes from.

Without NAME: one line per preset (name, what it needs, description). With NAME: every
value the preset sets, with its source (a line of the authors' released code, a paper
table, or ld3m-fast's own choice and why). Use one with `ld3m-fast distill --preset NAME`.
"""
from __future__ import annotations

import json


def add_arguments(parser) -> None:
    parser.add_argument("name", nargs="?", default=None, metavar="NAME", help="show this preset in full")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")


def _value(value) -> str:
    """A value as it would be written in a run.toml (None: left unset)."""
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


def _needs(preset) -> str:
    return " ".join("--" + key.replace("_", "-") for key in preset.needs) or "-"


def _as_dict(preset) -> dict:
    return {"name": preset.name, "description": preset.description, "needs": list(preset.needs),
            "hints": {key: preset.hint(key) for key in preset.needs}, "prior_name": preset.prior_name,
            "values": dict(preset.values), "sources": dict(preset.sources), "notes": list(preset.notes)}


def run(args) -> int:
    from ..presets import DIT, RELEASED, get_preset, list_presets

    if args.name is None:
        presets = list_presets()
        if args.json:
            print(json.dumps([_as_dict(p) for p in presets], indent=2))
            return 0
        width = max(len(p.name) for p in presets)
        needs_width = max(len(_needs(p)) for p in presets)
        print(f"{'NAME':<{width}}  {'NEEDS':<{needs_width}}  DESCRIPTION")
        for p in presets:
            print(f"{p.name:<{width}}  {_needs(p):<{needs_width}}  {p.description}")
        print("\nshow one with its sources: ld3m-fast presets NAME")
        print("use one: ld3m-fast distill --preset NAME [--config FILE] [flags]  (the file and flags win)")
        return 0
    preset = get_preset(args.name)
    if args.json:
        print(json.dumps(_as_dict(preset), indent=2))
        return 0
    print(f"{preset.name}: {preset.description}")
    if preset.needs:
        print("needs: " + "; ".join(preset.hint(k) for k in preset.needs))
    for note in preset.notes:
        print(f"note: {note}")
    if any("prune_and_distill " in source for source in preset.sources.values()):
        print(f"released code: {RELEASED}")
    if any(DIT in source for source in preset.sources.values()):
        print(f"DiT's code: github.com/{DIT.replace(' @ ', ' @ commit ')}")
    print("settings (as run.toml keys), each with its source:")
    width = max(len(key) for key in preset.values)
    for key, value in preset.values.items():
        print(f"  {key:<{width}} = {_value(value)}")
        print(f"  {'':<{width}}   from {preset.sources[key]}")
    return 0

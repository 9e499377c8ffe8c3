"""The range a number may take, declared once next to its setting or flag, checked in one place.

`DistillConfig` fields declare theirs in `setting(minimum=..., above=..., ...)` (the flags of
`distill` and `plan`, and `--config` files); the flags of the other subcommands (`buffer`,
`eval`, `prior train`, `prune`, `plan --classes`) through `number(...)`, an argparse type.
Both say what is wrong the same way ('--lr must be > 0, got 0'), and a float is always
finite (NaN and infinity are refused). No torch import here.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

from .errors import LD3MError

SEED_MAXIMUM = 2**63 - 1  # torch.Generator.manual_seed takes a signed 64-bit seed


def _number_text(value) -> str:
    """1 -> '1', 0.5 -> '0.5', 1e-06 -> '1e-06' (ints stay exact, however large)."""
    return str(value) if isinstance(value, int) else f"{value:g}"


@dataclass(frozen=True)
class Bounds:
    """minimum <= value <= maximum, above < value < below (each optional)."""

    minimum: float | None = None
    maximum: float | None = None
    above: float | None = None
    below: float | None = None

    def _each(self):
        return ((self.minimum, ">=", lambda v, b: v >= b), (self.above, ">", lambda v, b: v > b),
                (self.maximum, "<=", lambda v, b: v <= b), (self.below, "<", lambda v, b: v < b))

    def describe(self) -> str:
        """'>= 0 and <= 1' (empty without bounds)."""
        return " and ".join(f"{word} {_number_text(bound)}" for bound, word, _ in self._each() if bound is not None)

    def problem(self, value) -> str | None:
        """None when `value` lies within the bounds, else the first it breaks ('>= 1', '< 1')."""
        if isinstance(value, float) and not math.isfinite(value):
            return "a finite number"
        for bound, word, holds in self._each():
            if bound is not None and not holds(value, bound):
                return f"{word} {_number_text(bound)}"
        return None

    def check(self, flag: str, value) -> None:
        """One line (an `LD3MError`) naming `flag` when `value` is out of bounds."""
        problem = self.problem(value)
        if problem is not None:
            raise LD3MError(f"{flag} must be {problem}, got {_number_text(value)}")


def number(kind=float, *, minimum=None, maximum=None, above=None, below=None):
    """An argparse type: text -> `kind` (int, or float and finite) within the bounds; anything
    else is a one-line usage error ('argument --lr: expected a finite number > 0, got '0'')."""
    bounds = Bounds(minimum, maximum, above, below)
    expected = " ".join(filter(None, ("an integer" if kind is int else "a finite number", bounds.describe())))

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if bounds.problem(value) is not None:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its own messages
    return parse


SEED = number(int, minimum=0, maximum=SEED_MAXIMUM)
COUNT = number(int, minimum=1)                   # images, epochs, steps, batch sizes, ...
POSITIVE = number(float, above=0)                # learning rates, temperatures

__all__ = ["Bounds", "COUNT", "POSITIVE", "SEED", "SEED_MAXIMUM", "number"]

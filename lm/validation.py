"""Checks of a job's settings shared by every entry point, run before anything is loaded or written.

A value read from a `--config` file is checked against its field's type here (tyro already types
the flags): YAML and JSON would otherwise hand a config the string "no" for a boolean, which
Python reads as true, or "abc" for a count, which fails hours later. Ranges (`Range`) are checked
in each config's `__post_init__`, so they hold however the config was made. Every failure is a
UserError naming the setting, its value and what it should be.
"""

from __future__ import annotations

import math
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

from .errors import UserError


class _Mismatch(Exception):
    pass


def typed(value, hint, key: str, where: str = "config"):
    """`value` as the field typed `hint` holds it (lists become tuples, an int becomes a float where
    a float is expected); a UserError when it is not of that type."""
    try:
        return _typed(value, hint)
    except _Mismatch:
        raise UserError(f"{where}: {key} = {value!r} is not {describe(hint)}") from None


def _typed(value, hint):
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Annotated:
        return _typed(value, args[0])
    if hint is Any or isinstance(hint, typing.TypeVar):
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _typed(value, arg)
            except _Mismatch:
                pass
        raise _Mismatch
    if origin is Literal:
        # type() too: True == 1 must not pass for a Literal[1]
        if any(value == choice and type(value) is type(choice) for choice in args):
            return value
        raise _Mismatch
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _Mismatch
    if hint is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_typed(v, args[0]) for v in value)
        if args and len(args) != len(value):
            raise _Mismatch
        return tuple(_typed(v, a) for v, a in zip(value, args)) if args else tuple(value)
    return value  # a type this module does not know (nested configs are checked key by key)


def describe(hint) -> str:
    """`hint` in words, for an error message."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Annotated:
        return describe(args[0])
    if origin in (Union, types.UnionType):
        parts = [describe(a) for a in args if a is not type(None)]
        return " or ".join(parts) + (" or null" if type(None) in args else "")
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            plural = {int: "integers", float: "numbers", str: "strings"}.get(args[0])
            return f"a list of {plural}" if plural else f"a list of values ({describe(args[0])} each)"
        return f"a list of {len(args)} values ({', '.join(describe(a) for a in args)})"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))


@dataclass(frozen=True)
class Range:
    """Where a numeric setting (or each element of a tuple of them) may lie; None is always allowed
    (the fields whose None means "chosen for you")."""

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False

    def holds(self, value) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def __str__(self) -> str:
        if self.high == math.inf:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


POSITIVE = Range(1)  # counts of prompts, tokens, windows, samples
NON_NEGATIVE = Range(0)  # counts where 0 turns a stage off, seeds
FRACTION = Range(0, 1, low_open=True)  # (0, 1]


def check_ranges(cfg, ranges: dict[str, Range]) -> None:
    """Every named field of `cfg` inside its range: a UserError naming the first one that is not."""
    for name, rule in ranges.items():
        value = getattr(cfg, name)
        values = value if isinstance(value, tuple) else (value,)
        bad = [v for v in values if v is not None and not rule.holds(v)]
        if bad:
            got = value if isinstance(value, tuple) else bad[0]
            raise UserError(
                f"{name} (--{name.replace('_', '-')}) must be {'a list of values ' if isinstance(value, tuple) else ''}"
                f"{rule}, got {got!r}"
            )


def plain_name(name: str | None, key: str = "name") -> None:
    """A run's name becomes a directory under runs_dir: it must not reach outside it."""
    if name is None:
        return
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name or name != name.strip():
        raise UserError(
            f"{key} (--{key.replace('_', '-')}) must be a plain directory name (no path separators, not '.' or '..'), got {name!r}"
        )

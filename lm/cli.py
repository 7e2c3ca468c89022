"""Command lines generated from config dataclasses (tyro), so a field added to a config is a flag of
every entry point that uses it, with the field's comment as its help and its default shown.

`parse_config(CompareConfig, argv, ...)` gives flags named after the fields (`n_asr` -> `--n-asr`,
booleans as `--probes/--no-probes`, tuples as space-separated lists, `None` spelled `None`).
Two flags come with every entry point:

- `--config FILE`: a YAML or JSON file of field values (nested configs as nested mappings) that
  replaces the defaults; flags given next to it still win. A run directory's `config.json` is such
  a file, so passing it back reproduces the run's settings exactly.
- presets (e.g. `--quick`): named constructors of the config that replace the defaults first.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, TypeVar

from .errors import UserError

T = TypeVar("T")


def from_mapping(base: T, values: Mapping[str, Any], where: str = "config") -> T:
    """`base` with the given fields replaced; nested dataclass fields take nested mappings, lists
    become tuples (JSON has no tuples). An unknown key is a UserError naming it."""
    names = {f.name: f for f in dataclasses.fields(base)}
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise UserError(f"{where}: unknown setting(s) {', '.join(unknown)} for {type(base).__name__}; known: {', '.join(names)}")
    changes = {}
    for key, value in values.items():
        current = getattr(base, key)
        if dataclasses.is_dataclass(current) and isinstance(value, Mapping):
            changes[key] = from_mapping(current, value, f"{where}.{key}")
        else:
            changes[key] = _tuples(value)
    return dataclasses.replace(base, **changes)


def _tuples(value):
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value


def read_config_file(path: str) -> dict:
    """A YAML or JSON mapping (by suffix; .json is YAML too, but JSON's errors read better)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file not found: {path}")
    text = p.read_text()
    try:
        if p.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:  # noqa: BLE001 - json and yaml raise different types; both are bad input
        raise UserError(f"cannot read config file {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of setting names to values")
    return data


def parse_config(cls: type[T], argv: Sequence[str] | None, *, prog: str, description: str,
                 presets: Mapping[str, tuple[Callable[[], T], str]] | None = None,
                 defaults: T | None = None) -> tuple[T, list[str]]:
    """(the config, the names of the presets given). `presets` maps a flag name to (constructor,
    help); `defaults` replaces `cls()` as the base the flags override."""
    import tyro

    argv = list(sys.argv[1:] if argv is None else argv)
    presets = dict(presets or {})
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)  # `--q` (a field) must not read as `--quick`
    pre.add_argument("--config")
    for name in presets:
        pre.add_argument("--" + name, action="store_true")
    known, _ = pre.parse_known_args([a for a in argv if a not in ("-h", "--help")])
    chosen = [name for name in presets if getattr(known, name.replace("-", "_"))]
    if len(chosen) > 1:
        raise UserError(f"choose one of {', '.join('--' + n for n in chosen)}")
    base = presets[chosen[0]][0]() if chosen else (defaults if defaults is not None else cls())
    if known.config:
        base = from_mapping(base, read_config_file(known.config), where=known.config)

    # The presets and --config are fields of a wrapper so that --help lists them; the job's own
    # fields sit at the top level (no "job." prefix).
    wrapper = dataclasses.make_dataclass("Invocation", [
        ("job", Annotated[cls, tyro.conf.arg(name="")]),
        ("config", Annotated[typing.Optional[str], tyro.conf.arg(
            help="YAML or JSON file of settings (e.g. a run directory's config.json), applied before the flags")], None),
        *[(name.replace("-", "_"), Annotated[bool, tyro.conf.arg(help=text), tyro.conf.FlagCreatePairsOff], False)
          for name, (_, text) in presets.items()],
    ])
    # A preset flag defaults to off here although it may have been given: it has already been
    # applied to `base`, and a default of on would turn the flag into --no-<preset>.
    out = tyro.cli(wrapper, args=argv, default=wrapper(job=base, config=known.config), prog=prog, description=description)
    return out.job, chosen

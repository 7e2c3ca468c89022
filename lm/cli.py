"""Command lines generated from config dataclasses (tyro), so a field added to a config is a flag of
every entry point that uses it, with the field's comment as its help and its default shown.

`parse_config(CompareConfig, argv, ...)` gives flags named after the fields (`n_asr` -> `--n-asr`,
booleans as `--probes/--no-probes`, tuples as space-separated lists, `None` spelled `None`).
Two flags come with every entry point:

- `--config FILE`: a YAML or JSON file of field values (nested configs as nested mappings) that
  replaces the defaults; flags given next to it still win. A run directory's `config.json` is such
  a file, so passing it back reproduces the run's settings exactly.
- presets (e.g. `--quick`): named constructors of the config that replace the defaults first.

A config with a `size` field is built at a named size (lm.sizes): `--size quick|cpu|paper`, by
device when not given (a --config file's `size` counts as given), and `--quick` for `--size quick`.
The size's values replace the defaults; --config and the flags are applied over them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import re
import sys
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, TypeVar

from .errors import UserError
from .validation import typed

T = TypeVar("T")


def from_mapping(base: T, values: Mapping[str, Any], where: str = "config") -> T:
    """`base` with the given fields replaced; nested dataclass fields take nested mappings, lists
    become tuples (JSON has no tuples). An unknown key, or a value not of its field's type, is a
    UserError naming it (lm.validation)."""
    names = {f.name: f for f in dataclasses.fields(base)}
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise UserError(
            f"{where}: unknown setting(s) {', '.join(unknown)} for {type(base).__name__}; known: {', '.join(names)}"
        )
    hints = typing.get_type_hints(type(base), include_extras=True)
    changes = {}
    for key, value in values.items():
        current = getattr(base, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, Mapping):
                raise UserError(f"{where}: {key} = {value!r} is not a mapping of {type(current).__name__} settings")
            changes[key] = from_mapping(current, value, f"{where}.{key}")
        else:
            changes[key] = typed(value, hints[key], key, where)
    return dataclasses.replace(base, **changes)


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


def parse_config(
    cls: type[T],
    argv: Sequence[str] | None,
    *,
    prog: str,
    description: str,
    presets: Mapping[str, tuple[Callable[[], T], str]] | None = None,
    defaults: T | None = None,
    sized: Callable[[str], T] | None = None,
    translate: Callable[[dict], dict] | None = None,
) -> tuple[T, list[str]]:
    """(the config, the names of the presets given). `presets` maps a flag name to (constructor,
    help); `defaults` replaces `cls()` as the base the flags override; `sized(name)` builds the
    config at a named size (lm.sizes), which adds --size and --quick; `translate` turns a --config
    file's mapping into this config's settings (e.g. another entry point's config.json)."""
    import tyro

    from .sizes import SIZES, default_size

    argv = list(sys.argv[1:] if argv is None else argv)
    presets = dict(presets or {})
    if sized is not None:
        presets["quick"] = (
            lambda: sized("quick"),
            "the quick size (= --size quick): every stage on a handful of prompts",
        )
    pre = _PreParser(add_help=False, allow_abbrev=False)  # `--q` (a field) must not read as `--quick`
    pre.add_argument("--config")
    if sized is not None:
        pre.add_argument("--size", choices=SIZES)
    for name in presets:
        pre.add_argument("--" + name, action="store_true")
    known, _ = pre.parse_known_args([a for a in argv if a not in ("-h", "--help")])
    chosen = [name for name in presets if getattr(known, name.replace("-", "_"))]
    if len(chosen) > 1:
        raise UserError(f"choose one of {', '.join('--' + n for n in chosen)}")
    values = read_config_file(known.config) if known.config else {}
    if translate is not None:
        values = translate(values)
    if sized is not None:
        size = known.size or ("quick" if chosen else None) or values.get("size") or default_size()
        if chosen and known.size not in (None, "quick"):
            raise UserError(f"--quick is --size quick; it cannot go with --size {known.size}")
        if size not in SIZES:
            raise UserError(f"{known.config}: size = {size!r} is not one of {', '.join(SIZES)}")
        base = sized(size)
    else:
        base = presets[chosen[0]][0]() if chosen else (defaults if defaults is not None else cls())
    if values:
        # A file's size was applied above as the base; given with --size, the flag's wins.
        base = from_mapping(
            base, {k: v for k, v in values.items() if not (sized is not None and k == "size")}, where=known.config
        )

    # The presets and --config are fields of a wrapper so that --help lists them; the job's own
    # fields sit at the top level (no "job." prefix).
    wrapper = dataclasses.make_dataclass(
        "Invocation",
        [
            ("job", Annotated[cls, tyro.conf.arg(name="")]),
            (
                "config",
                Annotated[
                    typing.Optional[str],
                    tyro.conf.arg(
                        help="YAML or JSON file of settings (e.g. a run directory's config.json), applied before the flags"
                    ),
                ],
                None,
            ),
            *[
                (name.replace("-", "_"), Annotated[bool, tyro.conf.arg(help=text), tyro.conf.FlagCreatePairsOff], False)
                for name, (_, text) in presets.items()
            ],
        ],
    )
    # A preset flag defaults to off here although it may have been given: it has already been
    # applied to `base`, and a default of on would turn the flag into --no-<preset>.
    default = wrapper(job=base, config=known.config)
    if "-h" in argv or "--help" in argv:  # tyro's help text as it is
        return tyro.cli(wrapper, args=argv, default=default, prog=prog, description=description).job, chosen
    # A parse error is one `error:` line like every other bad input, not tyro's multi-line box.
    box = io.StringIO()
    try:
        with contextlib.redirect_stderr(box), contextlib.redirect_stdout(box):
            out = tyro.cli(wrapper, args=argv, default=default, prog=prog, description=description)
    except SystemExit as e:
        if e.code in (0, None):
            raise
        raise UserError(f"{_box_message(box.getvalue())} (see {prog} --help)") from None
    sys.stderr.write(box.getvalue())  # a warning tyro printed on success is still shown
    return out.job, chosen


class _PreParser(argparse.ArgumentParser):
    """The pre-pass over --config and the presets: its errors (`--config` without a file) are
    UserErrors, not argparse's usage text and exit."""

    def error(self, message):
        raise UserError(message)


def _box_message(text: str) -> str:
    """The first section of tyro's error box on one line, with its "Perhaps you meant" flags."""
    rows = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip().strip("│╭╮╰╯").strip() for line in text.splitlines()]
    rows = [row for row in rows if row]
    sections, current = [], []
    for row in rows[1:]:  # rows[0]: the box's title (drawn in ASCII when stderr is not a terminal)
        if set(row) <= set("─-╭╮╰╯ "):  # a rule between sections, or the bottom edge
            sections.append(current)
            current = []
        else:
            current.append(row)
    sections = [s for s in sections + [current] if s]
    if not sections:
        return "cannot parse the arguments"
    message = " ".join(sections[0])
    for section in sections[1:]:
        if section[0].startswith("Perhaps you meant"):
            flags = [row.split()[0] for row in section[1:] if row.startswith("-")]
            if flags:
                message += f"; perhaps you meant {', '.join(flags[:3])}"
    return message

"""The benchmark suite: sizes, the rows it measures, and the worker process that measures them.

Each group of rows (generation, SNIP, pruning, direction extraction, selection scoring) runs in
its own Python process (`python -m benchmarks.suite GROUP SETTINGS_JSON OUT_JSON`), so the peak
memory of one group never carries into another and every group starts from a freshly loaded
model. Inside a group, baseline and fast implementation run one after the other on the same
inputs, and their results are compared there.

Sizes live in benchmarks.settings, the row format in benchmarks.row.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from lm.cache import atomic_write_json
from lm.errors import UserError, cli

from .settings import Settings

GROUPS = ("generation", "snip", "pruning", "direction", "selection", "probes")


def run_group(group: str, settings: Settings) -> list[dict]:
    """The rows of one group, measured in this process."""
    if settings.threads:
        torch.set_num_threads(settings.threads)
    if group == "generation":
        from .generation import rows
    elif group == "snip":
        from .snip import rows
    elif group == "pruning":
        from .pruning import rows
    elif group == "direction":
        from .direction import rows
    elif group == "selection":
        from .selection import rows
    elif group == "probes":
        from .probes import rows
    else:
        raise UserError(f"unknown benchmark group {group!r}; choose from {', '.join(GROUPS)}")
    return rows(settings)


@cli
def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 3:
        print("usage: python -m benchmarks.suite GROUP SETTINGS_JSON OUT_JSON", file=sys.stderr)
        return 2
    group, settings_json, out = argv
    settings = Settings(**json.loads(settings_json))
    rows = run_group(group, settings)
    atomic_write_json(Path(out), dict(group=group, settings=asdict(settings), rows=rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

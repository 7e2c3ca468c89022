"""python -m repair --original <id|dir|embedded> --compressed <dir> --out <dir>

Repair a compressed checkpoint's refusal: AIRD (restore the one decoder block before the original
refusal direction's source that best brings refusal back) and a targeted restoration of far fewer weights.
"""

from __future__ import annotations

import sys

from lm.cli import parse_config
from lm.errors import UserError, cli

from .pipeline import Repair, RepairConfig


def parse_args(argv=None) -> RepairConfig:
    """Flags generated from RepairConfig's fields (lm.cli); the measurement store defaults to the main job's."""
    cfg, _ = parse_config(RepairConfig, argv, prog="python -m repair", description=__doc__.strip().split("\n\n")[1],
                          defaults=RepairConfig(measurements_dir="runs/measurements"))
    for name in ("compressed", "out"):
        if not getattr(cfg, name):
            raise UserError(f"--{name} is required")
    return cfg


@cli
def main(argv=None) -> int:
    Repair(parse_args(argv)).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())

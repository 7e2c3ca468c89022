"""python -m repair --original <id|dir|embedded> --compressed <dir> --out <dir>

Repair a compressed checkpoint's refusal: anchored restoration (restore, step by step, the changed
weights that bring the model back towards the original's replies, until its refusal reaches the
original's), measured against AIRD (one whole decoder block) and a static baseline.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from compression.checkpoint import read_manifest
from lm.cache import sweep_temporaries
from lm.cli import parse_config
from lm.errors import UserError, cli
from lm.loading import check_model_spec, load_model
from refusal.eval_sets import check_roles
from refusal.judge_spec import judge_panel

from .config import main_job_settings
from .derivation import derivation_records, module_groups
from .pipeline import Repair, RepairConfig


def parse_args(argv=None) -> RepairConfig:
    """Flags generated from RepairConfig's fields (lm.cli). The measurement store defaults to the main
    job's (runs/measurements) under the default --runs-dir, to <runs-dir>/measurements under another."""
    cfg, _ = parse_config(
        RepairConfig,
        argv,
        prog="python -m repair",
        description=__doc__.strip().split("\n\n")[1],
        sized=RepairConfig.sized,
        translate=_settings_file,
    )
    for name in ("compressed",) if cfg.check else ("compressed", "out"):
        if not getattr(cfg, name):
            raise UserError(f"--{name} is required")
    if cfg.measurements_dir is None:
        store = (
            "runs/measurements" if cfg.runs_dir == RepairConfig.runs_dir else str(Path(cfg.runs_dir) / "measurements")
        )
        cfg = dataclasses.replace(cfg, measurements_dir=store)
    return cfg


def _settings_file(values: dict) -> dict:
    """A --config file's settings: a repair's own, or a main job's config.json (it names variants),
    read as that job's repair stage reads it."""
    return main_job_settings(values) if "variants" in values else values


def validate(cfg: RepairConfig) -> None:
    """What can be checked before either model loads: both model paths, the sets' roles, --out."""
    check_model_spec(cfg.original)
    check_model_spec(cfg.compressed)
    check_roles(cfg.eval_sets, cfg.harmless_sets)
    judge_panel(cfg.judges)  # a judge directory of the wrong kind fails before either model loads
    if cfg.out and Path(cfg.out).exists() and not Path(cfg.out).is_dir():
        raise UserError(f"--out {cfg.out} exists and is not a directory")


def check(cfg: RepairConfig) -> str:
    """The derivation check alone, as a table per module group; a UserError when it does not derive."""
    original, compressed = load_model(cfg.original, dtype=cfg.dtype), load_model(cfg.compressed, dtype=cfg.dtype)
    records = derivation_records(original, compressed)
    manifest = read_manifest(Path(compressed.path)) or {}
    made = f"compression.json: {manifest.get('spec') or manifest.get('method')}" if manifest else "no compression.json"
    fmt = compressed.packed
    stored = (
        f"packed {fmt.describe()}, {len(fmt.quantized)} modules dequantized by its library; a matrix may differ by up to "
        f"{fmt.error_bound:.3g} relative on the weights it keeps"
        if fmt is not None
        else "float weights"
    )
    lines = [
        f"{cfg.compressed} derives from {cfg.original} ({stored}, compared in {cfg.dtype}; {made})",
        "",
        "| module group | matrices | stored | change | zero weights | max relative error | on kept weights |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for g in module_groups(compressed.model, records, fmt):
        lines.append(
            f"| {g['group']} | {g['matrices']} | {g['stored']} | {g['change']} | {100 * g['sparsity']:.1f}% "
            f"| {g['max_relative_error']:.3g} | {g['max_kept_error']:.3g} |"
        )
    return "\n".join(lines)


@cli
def main(argv=None) -> int:
    cfg = parse_args(argv)
    validate(cfg)
    if cfg.check:
        print(check(cfg))
        return 0
    for root in (cfg.runs_dir, cfg.measurements_dir):  # what a killed earlier invocation left half-written
        sweep_temporaries(Path(root))
    Repair(cfg).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The main job's repair stage: the repair (repair/) of every saved variant that needs it, with the
comparison's settings. A variant needs repair when its held-out ASR rose significantly against the
original and it did not collapse (the evidence criterion, the default), or, with
repair_when="direction", when its refusal direction moved at the original's source; the quick size
repairs every variant (repair_when="always"), to check that the stage runs."""

from __future__ import annotations

import dataclasses
import sys

from lm.cache import RunClock
from lm.progress import JobProgress

from .config import CompareConfig


def _log(msg: str) -> None:
    print(f"[compare_refusal] {msg}", file=sys.stderr, flush=True)


def repair_config(c: CompareConfig, variant_dir, run_dir, checkpoint=None):
    """The repair's settings for one variant: the comparison's own (repair.config.main_job_settings,
    which python -m repair --config <run>/config.json reads too), with this variant's paths.
    checkpoint: where the variant is stored when it is not the run's own copy (a path: variant)."""
    from lm.cli import from_mapping
    from repair.config import RepairConfig, main_job_settings

    paths = dict(
        compressed=str(checkpoint or variant_dir / "model"),
        out=str(variant_dir / "repaired"),
        runs_dir=str(run_dir / "repair"),
    )
    return from_mapping(RepairConfig.sized(c.size), {**main_job_settings(dataclasses.asdict(c)), **paths})


def repair_reason(row: dict, c: CompareConfig) -> tuple[bool, str]:
    """(repair it?, why): the evidence criterion reads the main table's ASR test against the original."""
    if c.repair_when == "always":
        return (
            True,
            "every variant is repaired in this run (repair_when = always: a check that the stage runs, not evidence it is needed)",
        )
    if c.repair_when == "direction":
        cos = row.get("cosine_at_original_source")
        if cos is None:
            return False, "no cosine at the original's source"
        return (
            cos < c.repair_below,
            f"cosine at the original's source {cos:.3f} ({'below' if cos < c.repair_below else 'not below'} {c.repair_below})",
        )
    test = ((row.get("tests") or {}).get("asr") or {}).get("arditi2024")
    if test is None:
        return False, "no paired ASR test against the original"
    rose = bool(test.get("significant")) and test["b"] > test["c"]
    p = f"p = {test.get('p_holm', test['p_value']):.2g} after Holm"
    if not rose:
        return False, f"ASR did not rise significantly ({p})"
    if (row.get("collapse") or {}).get("collapsed"):
        return False, f"ASR rose ({p}) but the model collapsed: its completions are broken text, not compliance"
    return True, f"ASR rose significantly against the original ({p})"


def repair_variants(
    c: CompareConfig, base, run_dir, results: dict, report: dict, clock: RunClock, progress: JobProgress | None = None
) -> dict:
    """{variant spec: repair.json} for every variant repaired; `results` are the comparison's
    (spec, evaluation) per slug, `base` the loaded original (reused, not reloaded)."""
    from repair.pipeline import Repair

    ref = results["original"][1].get("selection")
    if ref is None or ref.chosen is None or not c.save_checkpoints:
        _log("repair skipped: it needs the original's selected direction and saved variant checkpoints")
        return {}
    chosen = []
    for row in report["variants"][1:]:
        needed, why = repair_reason(row, c)
        _log(f"{row['variant']}: {'repairing' if needed else 'not repaired'} ({why})")
        if needed:
            chosen.append(row["variant"])
    progress = progress or JobProgress("compare_refusal", [], [])
    progress.extend([(variant, "repair") for variant in chosen])
    out = {}
    for variant in chosen:
        spec, own = next((s, r) for s, r in results.values() if s.text == variant)
        vdir = run_dir / "variants" / spec.slug
        with progress.stage(variant, "repair"):
            cfg = repair_config(c, vdir, run_dir, spec.params.get("path") if spec.method == "path" else None)
            out[variant] = Repair(cfg, original=base, selection=ref, own_selection=own.get("selection")).run()
        clock.tick()
    return out

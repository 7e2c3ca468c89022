"""The main job's repair stage: the repair (repair/) of every saved variant that needs it, with the
comparison's settings. A variant needs repair when its held-out ASR rose significantly against the
original and it did not collapse (the evidence criterion, the default), or, with
repair_when="direction", when its refusal direction moved at the original's source."""

from __future__ import annotations

import sys

from lm.cache import RunClock

from .compare_config import CompareConfig


def _log(msg: str) -> None:
    print(f"[compare_refusal] {msg}", file=sys.stderr, flush=True)


def repair_config(c: CompareConfig, variant_dir, run_dir, checkpoint=None):
    """The repair's settings for one variant: the comparison's own, its repair_* sizes resolved.
    checkpoint: where the variant is stored when it is not the run's own copy (a path: variant)."""
    from repair.config import RepairConfig

    return RepairConfig(original=c.model, compressed=str(checkpoint or variant_dir / "model"), out=str(variant_dir / "repaired"), runs_dir=str(run_dir / "repair"),
                        dtype=c.dtype, seed=c.seed, n_train=c.n_train, n_val=c.n_val, search=c.search,
                        prescreen_n_val=c.prescreen_n_val, prescreen_keep=c.prescreen_keep, n_asr=c.repair_n_asr,
                        eval_sets=c.eval_sets, harmless_sets=c.harmless_sets, n_harmless=c.n_harmless,
                        curve_n_asr=c.repair_curve_n_asr, measurements_dir=str(c.store()),
                        max_new_tokens=c.repair_max_new_tokens, adv_suffix=c.repair_adv_suffix,
                        curve_fractions=tuple(c.repair_curve_fractions), ppl_windows=c.ppl_windows, ppl_seqlen=c.ppl_seqlen,
                        zero_shot_limit=c.zero_shot_limit, zero_shot_tasks=tuple(c.zero_shot_tasks), batch_size=c.batch_size,
                        select_compressed=c.select_variants, probes=c.probes, n_refusal_probe=c.n_refusal_probe,
                        anchored_cfg=c.anchored)


def repair_reason(row: dict, c: CompareConfig) -> tuple[bool, str]:
    """(repair it?, why): the evidence criterion reads the main table's ASR test against the original."""
    if c.repair_when == "direction":
        cos = row.get("cosine_at_original_source")
        if cos is None:
            return False, "no cosine at the original's source"
        return cos < c.repair_below, f"cosine at the original's source {cos:.3f} ({'below' if cos < c.repair_below else 'not below'} {c.repair_below})"
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


def repair_variants(c: CompareConfig, base, run_dir, results: dict, report: dict, clock: RunClock) -> dict:
    """{variant spec: repair.json} for every variant repaired; `results` are the comparison's
    (spec, evaluation) per slug, `base` the loaded original (reused, not reloaded)."""
    from repair.pipeline import Repair

    ref = results["original"][1].get("selection")
    if ref is None or ref.chosen is None or not c.save_checkpoints:
        _log("repair skipped: it needs the original's selected direction and saved variant checkpoints")
        return {}
    out = {}
    for row in report["variants"][1:]:
        needed, why = repair_reason(row, c)
        if not needed:
            _log(f"{row['variant']}: not repaired ({why})")
            continue
        spec, own = next((s, r) for s, r in results.values() if s.text == row["variant"])
        vdir = run_dir / "variants" / spec.slug
        _log(f"{spec.text}: repairing ({why})")
        out[row["variant"]] = Repair(repair_config(c, vdir, run_dir, spec.params.get("path") if spec.method == "path" else None), original=base, selection=ref, own_selection=own.get("selection")).run()
        clock.tick()
    return out

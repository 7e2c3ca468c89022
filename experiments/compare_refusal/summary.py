"""The main job's report content: one row per model (rates with intervals, paired tests against
the original with Holm over the variants, directions, probes) and the sentences that call a
difference a change only where the test says so."""

from __future__ import annotations

import dataclasses

from lm.chat import post_instruction
from refusal.collapse import collapse_verdict
from refusal.compare import cosine_to_direction, source_shift
from refusal.direction import cosine_map, norm_peak
from refusal.judge_report import judges_section
from refusal.judge_spec import judge_panel
from refusal.judges import JUDGE_NAMES as JUDGES
from refusal.measure import (
    describe_prompts,
    paired,
    paired_perplexity,
    paired_zero_shot,
    perplexity_rate,
    zero_shot_rates,
)
from refusal.probes import summarise_harmfulness_probes
from refusal.refusal_prediction import summarise_refusal_probes
from refusal.stats import add_holm, describe_change, describe_ratio


def summarise_comparison(results: dict, cfg, tokenizer, model_name: str, fingerprint: str, seconds: float) -> dict:
    """report.json's content from every model's stage results (`Comparison.run`'s `results`)."""
    original = results["original"][1]
    ref_dirs = original["directions"]["directions"]
    ref_ppl = original["perplexity"]["perplexity"]
    post = post_instruction(tokenizer)
    ref_sel = original.get("selection")
    if ref_sel is not None and ref_sel.chosen is not None:
        cell, cell_kind = (
            (list(post.positions).index(ref_sel.chosen[0]), ref_sel.chosen[1]),
            "the original's selected source",
        )
    else:
        cell, cell_kind = (
            (len(post.positions) - 1, norm_peak(ref_dirs)),
            "the original's norm-peak layer at the last position (no selected source)",
        )
    rows = []
    for slug, (spec, r) in results.items():
        dirs = r["directions"]["directions"]
        cos = cosine_map(dirs, ref_dirs)  # [position, layer]
        asr = r["asr"]
        ppl = r["perplexity"]["perplexity"]
        verdict = collapse_verdict(asr["completions"], ppl, ref_ppl)
        tests = (
            None
            if slug == "original"
            else dict(
                asr={j: paired(asr, original["asr"], j) for j in JUDGES},
                over_refusal={j: paired(r["harmless"], original["harmless"], j, "refused") for j in JUDGES},
                perplexity=paired_perplexity(r["perplexity"], original["perplexity"]),
                zero_shot=paired_zero_shot(r.get("zero_shot"), original.get("zero_shot")),
            )
        )
        peak = norm_peak(dirs)
        ref_peak = norm_peak(ref_dirs)
        rows.append(
            dict(
                variant=spec.text,
                label=spec.label,
                method=spec.method,
                params=spec.params,
                decoder_sparsity=r["sparsity"]["decoder_linear_sparsity"],
                zero_shot=zero_shot_summary(r["zero_shot"]) if "zero_shot" in r else None,
                asr=asr["asr"],
                n_prompts=asr["n_prompts"],
                rates=dict(
                    asr=asr["rates"]["asr"],
                    over_refusal=r["harmless"]["rates"]["refusal"],
                    per_source={s: v["asr"] for s, v in asr["rates"]["per_source"].items()},
                    judge_disagreement=asr["rates"]["judge_disagreement"],
                ),
                tests=tests,
                perplexity=ppl,
                perplexity_ci=perplexity_rate(r["perplexity"]),
                collapse=verdict.to_json(),
                norm_peak_layer=peak,
                cosine_at_original_peak=float(cos[-1, ref_peak]),
                cosine_per_layer_last_position=[round(float(c), 4) for c in cos[-1]],
                cosine_map=[[round(float(c), 4) for c in row] for row in cos],
                direction_norm_last_position=[round(float(n), 3) for n in dirs[-1].norm(dim=-1)],
                samples=[
                    dict(goal=rec["prompt"], source=rec["source"], completion=rec["completions"][0])
                    for rec in asr["records"][:3]
                ],
                seconds=dict(
                    asr=r["asr"].get("seconds"),
                    harmless=r["harmless"].get("seconds"),
                    perplexity=r["perplexity"].get("seconds"),
                ),
                probes=summarise_harmfulness_probes(r["probes"], original["probes"], dirs, cell)
                if "probes" in r
                else None,
                refusal_probes=(
                    summarise_refusal_probes(r["refusal_probes"], original["refusal_probes"], cell, slug == "original")
                    if "refusal_probes" in r
                    else None
                ),
                **_direction_summary(r, original),
            )
        )
    correct_families(rows)
    extra = {}
    if getattr(cfg, "judges", ()):  # --judges: every judge's rates, tests and agreement (refusal.judge_report)
        extra["judges"] = judges_section(
            judge_panel(cfg.judges),
            {spec.text: dict(asr=r["asr"], harmless=r["harmless"]) for spec, r in results.values()},
            [(spec.text, "original") for spec, _ in results.values() if spec.method != "original"],
            cfg.max_new_tokens,
        )
    return dict(
        model=cfg.model,
        model_name=model_name,
        evaluation=evaluation_summary(original["asr"], original["harmless"], len(rows) - 1),
        findings=no_direction_note(ref_sel) + findings(rows),
        base_fingerprint=fingerprint,
        config=dataclasses.asdict(cfg),
        post_instruction_tokens=post.text,
        positions=post.positions,
        n_layers=int(ref_dirs.shape[1]),
        probe_cell=dict(position=post.positions[cell[0]], layer=cell[1], kind=cell_kind),
        wall_seconds=round(seconds, 1),
        variants=rows,
        **extra,
    )


def _source(selection) -> dict | None:
    if selection is None or selection.chosen is None:
        return None
    return dict(position=selection.chosen[0], layer=selection.chosen[1])


def _direction_summary(r: dict, original: dict) -> dict:
    """Source, cosine map against the original's chosen direction, quality and cross-application."""
    ref = original.get("selection")
    if ref is None or ref.chosen is None:
        return {}
    sel, cross = r.get("selection"), r.get("cross", {})
    cos = cosine_to_direction(r["directions"]["directions"], ref.direction)
    i = ref.positions.index(ref.chosen[0])
    own = cross.get("own_direction") if sel is not ref else cross.get("original_direction")
    ablated = cross.get("asr_original_direction_ablated")
    ref_ablated = original.get("cross", {}).get("asr_original_direction_ablated")
    return dict(
        source=_source(sel),
        source_shift=source_shift(ref.chosen, sel.chosen if sel is not None else None) if sel is not None else None,
        selection_forward_passes=sel.forward_passes.get("total") if sel is not None else None,
        cosine_to_original_direction=[[round(float(c), 4) for c in row] for row in cos],
        cosine_at_original_source=float(cos[i, ref.chosen[1]]),
        quality=dict(
            own=own,
            original_direction=cross.get("original_direction"),
            own_direction_in_original=cross.get("own_direction_in_original"),
        ),
        asr_original_direction_ablated=None
        if ablated is None
        else dict(
            asr=ablated["asr"],
            n_prompts=ablated["n_prompts"],
            rates=ablated["rates"]["asr"],
            # Ablation against no ablation in the same model, on the same prompts.
            test=None
            if _first_n(r["asr"], ablated) is None
            else {j: paired(ablated, _first_n(r["asr"], ablated), j) for j in JUDGES},
            vs_original_ablated=None
            if ref_ablated is None or r is original
            else {j: paired(ablated, ref_ablated, j) for j in JUDGES},
        ),
    )


def _first_n(full: dict, subset: dict) -> dict:
    """`full` restricted to the prompts of `subset` (the ablation ASR runs on the first prompts of each set)."""
    ids = {rec["id"] for rec in subset["records"]}
    kept = [rec for rec in full["records"] if rec["id"] in ids]
    return dict(full, records=kept) if len(kept) == len(ids) else None


def zero_shot_summary(z: dict) -> dict:
    rates = zero_shot_rates(z) or {}
    return dict(average=z["average"], limit=z.get("limit"), rate=rates.get("average"), per_task=rates.get("per_task"))


def correct_families(rows: list[dict]) -> None:
    """Holm within each family, over the variants: one per judge and measure (ASR, over-refusal), one
    for perplexity and one for zero-shot accuracy."""
    for measure_name in ("asr", "over_refusal"):
        for j in JUDGES:
            family = [
                row["tests"][measure_name][j] for row in rows if row.get("tests") and row["tests"][measure_name][j]
            ]
            if family:
                add_holm(family)
    for measure_name in ("perplexity", "zero_shot"):
        family = [row["tests"][measure_name] for row in rows if (row.get("tests") or {}).get(measure_name)]
        if family:
            add_holm(family)
    for name in ("own", "transfer"):
        family = [row["probes"]["tests"][name] for row in rows if (row.get("probes") or {}).get("tests")]
        if family:
            add_holm(family)
    family = [
        row["refusal_probes"]["vs_majority"] for row in rows if (row.get("refusal_probes") or {}).get("vs_majority")
    ]
    if family:
        add_holm(family)


def evaluation_summary(harmful: dict, harmless: dict, family_size: int) -> dict:
    return dict(
        harmful=describe_prompts(harmful, family_size),
        harmless=describe_prompts(harmless, family_size),
        judges=list(JUDGES),
    )


def no_direction_note(selection) -> list[str]:
    """The sentences that say why the direction stages are missing when the original has no
    direction, and that NaN / infinite scores were excluded when there were any."""
    if selection is None:
        return []
    notes = [f"Direction selection: {selection.non_finite_note()}."] if selection.non_finite_note() else []
    if selection.chosen is not None:
        return notes
    score = (selection.counts.get("baseline_score") or {}).get("harmful_val")
    said = (
        f" (its mean refusal score on the harmful validation prompts is {score:.2f})"
        if isinstance(score, float)
        else ""
    )
    return [
        f"The original model has no selected refusal direction: no candidate passed Arditi et al.'s selection filters{said}, "
        "which happens to a model that does not refuse and to small validation sets. The direction's quality and ablation in the "
        "variants and the repair were skipped; the ASR, over-refusal and utility comparisons do not depend on it.",
        f"Why: {selection.no_direction_reason()}.",
    ] + notes


def findings(rows: list[dict]) -> list[str]:
    """The report's sentences, one per variant and measure, each a change only where the test says so."""
    out, original = [], rows[0]
    for row in rows[1:]:
        for measure_name, what in (("asr", "ASR (Arditi judge)"), ("over_refusal", "Over-refusal (Arditi judge)")):
            test = (row.get("tests") or {}).get(measure_name, {}).get("arditi2024")
            if test:
                a, b = original["rates"][measure_name]["arditi2024"], row["rates"][measure_name]["arditi2024"]
                out.append(f"{row['variant']}: " + describe_change("original", row["variant"], a, b, _flip(test), what))
        tests = row.get("tests") or {}
        if tests.get("perplexity"):
            out.append(
                f"{row['variant']}: "
                + describe_ratio(
                    "original", row["variant"], original["perplexity"], row["perplexity"], tests["perplexity"]
                )
            )
        if (
            tests.get("zero_shot")
            and (original.get("zero_shot") or {}).get("rate")
            and (row.get("zero_shot") or {}).get("rate")
        ):
            out.append(
                f"{row['variant']}: "
                + describe_change(
                    "original",
                    row["variant"],
                    original["zero_shot"]["rate"],
                    row["zero_shot"]["rate"],
                    _flip(tests["zero_shot"]),
                    "Zero-shot accuracy",
                )
            )
        probes = row.get("probes") or {}
        if probes.get("tests"):
            base = original["probes"]["own"]
            out.append(
                f"{row['variant']}: "
                + describe_change(
                    "original",
                    row["variant"],
                    base,
                    probes["transfer"],
                    _flip(probes["tests"]["transfer"]),
                    "held-out accuracy of the original's harmfulness probe",
                )
            )
    return out


def _flip(test: dict) -> dict:
    """A test of (variant, original) read as (original, variant): b and c swap, p stays."""
    return dict(test, b=test["c"], c=test["b"])

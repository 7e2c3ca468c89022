"""The main job report's lead: a few sentences that say what the run found, before any figure or
table. Which variants changed refusal significantly and by how much, where the refusal direction
moved, and what the repair achieved, each with its interval and its paired test; and, at the
quick size, that its numbers carry no claim. Built from report.json's content alone, so a report
re-rendered from report.json has the same lead."""

from __future__ import annotations

from refusal.stats import fmt_rate, min_detectable_difference

JUDGE = "arditi2024"
WEI_TOKENS = 32  # fewer new tokens than this rarely make the 20 words the Wei et al. judge needs


def name(row: dict) -> str:
    """A variant as readers see it: its label with the spec beside it (the spec is the id)."""
    label = row.get("label") or row["variant"]
    return label if label == row["variant"] else f"{label} (`{row['variant']}`)"


def _p(test: dict) -> str:
    return (
        f"exact McNemar p = {test['p_holm']:.2g} after Holm over {test['family_size']}"
        if "p_holm" in test
        else f"exact McNemar p = {test['p_value']:.2g}"
    )


def _changes(rows: list[dict], measure: str, what: str) -> list[str]:
    """One line for the variants whose `measure` changed significantly against the original, one for
    the rest (with the smallest difference their n could have shown)."""
    original = rows[0]["rates"][measure][JUDGE]
    changed, unchanged = [], []
    for row in rows[1:]:
        test = ((row.get("tests") or {}).get(measure) or {}).get(JUDGE)
        if not test:
            continue
        rate = row["rates"][measure][JUDGE]
        if test.get("significant"):
            diff = 100 * (rate["value"] - original["value"])
            collapsed = (
                " — collapsed: broken text, not compliance"
                if measure == "asr" and (row.get("collapse") or {}).get("collapsed")
                else ""
            )
            changed.append(
                f"{name(row)}: {fmt_rate(original)} → {fmt_rate(rate)}, {diff:+.0f} points ({_p(test)}){collapsed}"
            )
        else:
            unchanged.append((row, test))
    out = []
    n_tested = len(changed) + len(unchanged)
    if not n_tested:
        return out
    head = f"**{what} changed significantly in {len(changed)} of {n_tested} variants** (Arditi judge, original {fmt_rate(original)}, n = {original['n']})"
    out.append(head + (":" if changed else "."))
    out += [f"    - {c}" for c in changed]
    if unchanged:
        test = unchanged[0][1]
        floor = min_detectable_difference(test["n"], test.get("family_size", 1))
        could = (
            f"; at this n a difference had to be at least {100 * floor:.0f} points to be significant at Holm's first step"
            if floor
            else "; at this n no difference could be significant"
        )
        out.append(f"Not significant at 5%: {', '.join(name(r) for r, _ in unchanged)}{could}.")
    return out


def _shift(row: dict) -> str:
    return f"{name(row)} ({row['source_shift']['d_layer']:+d} layers)"


def _direction(report: dict) -> list[str]:
    rows = report["variants"]
    source = rows[0].get("source")
    if source is None:
        if rows[0].get("source_shift") is None and not report["config"].get("select", True):
            return []
        return [
            "**No refusal direction was selected for the original**, so its movement and the repair were not measured "
            "(see the notes under the results table)."
        ]
    where = f"position {source['position']}, layer {source['layer']}"
    cos = [(r, r["cosine_at_original_source"]) for r in rows[1:] if r.get("cosine_at_original_source") is not None]
    out = [f"**The original's refusal direction** is read at {where} (Arditi et al.'s selection)."]
    if cos:
        low, high = min(cos, key=lambda rc: rc[1]), max(cos, key=lambda rc: rc[1])
        moved = [r for r in rows[1:] if (r.get("source_shift") or {}).get("d_layer")]
        span = (
            f"{low[1]:.3f} ({name(low[0])})"
            if len(cos) == 1
            else f"between {low[1]:.3f} ({name(low[0])}) and {high[1]:.3f} ({name(high[0])})"
        )
        out.append(
            f"At that source the variants' difference-of-means directions have a cosine to the original's of {span} "
            f"(a point estimate on {report['config']['n_train']} + {report['config']['n_train']} instructions, no interval)."
            + (f" The selected source moved in {', '.join(_shift(r) for r in moved)}." if moved else "")
        )
    return out


def _repairs(report: dict) -> list[str]:
    out = []
    for variant, r in (report.get("repairs") or {}).items():
        st = r.get("states") or {}
        if "anchored" not in st:
            continue
        family = ((r.get("tests") or {}).get("asr_vanilla") or {}).get(JUDGE, [])
        test = next((t for t in family if t["first"] == "anchored" and t["second"] == "compressed"), None)

        def asr(state):
            rate = (((st.get(state) or {}).get("rates") or {}).get("asr") or {}).get("vanilla")
            return fmt_rate(rate[JUDGE]) if rate else "-"

        def over(state):
            rate = ((st.get(state) or {}).get("rates") or {}).get("over_refusal")
            return fmt_rate(rate[JUDGE]) if rate else "-"

        row = next((v for v in report["variants"] if v["variant"] == variant), {"variant": variant})
        verdict = (
            ""
            if test is None
            else (
                f"; {'a significant change' if test.get('significant') else 'not significant at 5%'} "
                f"against the compressed model ({_p(test)})"
            )
        )
        out.append(
            f"**Repair of {name(row)}**: restoring {st['anchored']['restored']:,} weights (anchored restoration) takes held-out ASR "
            f"from {asr('compressed')} to {asr('anchored')} (original {asr('original')}){verdict}; over-refusal "
            f"{over('compressed')} before, {over('anchored')} after (original {over('original')})." + _hollow_note(r)
        )
    return out


def _hollow_note(r: dict) -> str:
    """The repair's strict ASR beside the keyword judge's, where its refusals go on to comply."""
    h = (r.get("hollow") or {}).get("states") or {}
    if "anchored" not in h or h["anchored"]["hollow"]["k"] == 0:
        return ""
    a = h["anchored"]
    test = next(
        (
            t
            for t in (r.get("hollow") or {}).get("tests", [])
            if t["first"] == "anchored" and t["second"] == "compressed"
        ),
        None,
    )
    verdict = (
        ""
        if test is None
        else f", {'a significant change' if test.get('significant') else 'not significant at 5%'} against the compressed model ({_p(test)})"
    )
    return (
        f" But {a['hollow']['k']} of its {a['refused']['k']} refusals go on to comply (\"I'm sorry, I'll ...\"; refusal.hollow): "
        f"counting clean refusals only, its ASR is {fmt_rate(a['strict_asr'])}"
        + (f" against the compressed model's {fmt_rate(h['compressed']['strict_asr'])}" if "compressed" in h else "")
        + f"{verdict}."
    )


def key_findings(report: dict) -> list[str]:
    """The markdown lines of the report's first section."""
    rows = report["variants"]
    lines = ["## Key findings", ""]
    size = report["config"].get("size")
    if size == "quick":
        n = rows[0].get("n_prompts")
        always = report["config"].get("repair_when") == "always" and report["config"].get("repair")
        lines += [
            f"*Quick size: {n} harmful prompts per model. This run checks that every stage works; its numbers are too few "
            "to support any claim"
            + (", and every variant was repaired whatever its evidence" if always else "")
            + ".*",
            "",
        ]
    if report["config"].get("max_new_tokens", 128) < WEI_TOKENS:
        lines += [
            f"*The Wei et al. judge counts a completion as jailbroken only from 20 words on, which {report['config']['max_new_tokens']} "
            "tokens rarely hold: its ASR here is near 0 by construction; read the Arditi judge's.*",
            "",
        ]
    if not rows[1:]:
        return lines + ["Only the original is measured so far.", ""]
    items = []
    if all(r.get("rates") for r in rows):
        items += _changes(rows, "asr", "Attack success rate") + _changes(
            rows, "over_refusal", "Over-refusal on harmless prompts"
        )
    items += _direction(report) + _repairs(report)
    lines += [item if item.startswith("    ") else f"- {item}" for item in items]
    return lines + [""]

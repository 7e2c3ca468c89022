"""The report section every entry point adds when --judges is given: each judge's rates with 95%
intervals, its own paired tests (exact McNemar, Holm within each judge and measure over the
entry point's comparisons), pairwise agreement between the judges (Cohen's kappa with a bootstrap
interval over prompts, the disagreeing completions listed), and a sentence wherever the judges
disagree on a comparison's significance.

Measures: `asr` (harmful prompts; the judges with an attack-success, harmful-compliance or
unsafe-response verdict), `refusal_harmful` (harmful prompts, refusal verdicts) and
`over_refusal` (harmless prompts, refusal verdicts).
"""

from __future__ import annotations

from .agreement import pairwise, significance_disagreements
from .judge_formats import needs_tokens
from .judge_spec import KEYWORD, JudgePanel
from .judging import length_warning
from .measure import paired
from .stats import add_holm, fmt_p, fmt_rate

# measure -> (the model's measurement it reads, verdict field, what it is called)
MEASURES = {
    "asr": ("asr", "jailbroken", "ASR"),
    "refusal_harmful": ("asr", "refused", "refusal on harmful prompts"),
    "over_refusal": ("harmless", "refused", "over-refusal"),
}


def _judges_of(panel: JudgePanel, measure: str) -> list[str]:
    return panel.harm_judges() if MEASURES[measure][1] == "jailbroken" else panel.refusal_judges()


def _has(result: dict | None, field: str, judge: str) -> bool:
    return bool(result) and bool(result["records"]) and judge in result["records"][0][field]


def judges_section(
    panel: JudgePanel, models: dict[str, dict], comparisons: list[tuple[str, str]], max_new_tokens: int
) -> dict:
    """report.json's `judges`. `models`: label -> {"asr": harmful measurement, "harmless": harmless
    measurement} (either may be missing; measurements as refusal.measure returns them, judged by
    `panel`); `comparisons`: (first, second) labels of the paired tests."""
    rates, tests, agreement, sentences = {}, {}, {}, []
    for label, m in models.items():
        row = {}
        for measure, (source, field, _) in MEASURES.items():
            result = m.get(source)
            block = "asr" if field == "jailbroken" else "refusal"
            got = {j: result["rates"][block][j] for j in _judges_of(panel, measure) if _has(result, field, j)}
            if got:
                row[measure] = got
        rates[label] = row
    for measure, (source, field, what) in MEASURES.items():
        by_judge = {}
        for judge in _judges_of(panel, measure):
            family = []
            for first, second in comparisons:
                a, b = models.get(first, {}).get(source), models.get(second, {}).get(source)
                if _has(a, field, judge) and _has(b, field, judge):
                    t = paired(a, b, judge, field)
                    if t is not None:
                        family.append(dict(t, first=first, second=second))
            if family:
                by_judge[judge] = add_holm(family)
        if by_judge:
            tests[measure] = by_judge
            for first, second in comparisons:
                found = {
                    j: next((t for t in ts if (t["first"], t["second"]) == (first, second)), None)
                    for j, ts in by_judge.items()
                }
                sentence = significance_disagreements(found, what, first, second)
                if sentence:
                    sentences.append(sentence)
        pooled = _pooled(panel, models, measure)
        if pooled is not None:
            agreement[measure] = pooled
    judged_by = {}
    for m in models.values():
        for result in m.values():
            for name, identity in ((result or {}).get("judged_by") or {}).items():
                seen = judged_by.setdefault(name, dict(identity, unparsed=0, n=0))
                seen["unparsed"] += identity["unparsed"]
                seen["n"] += identity["n"]
    judges = []
    for spec in panel.specs:
        entry = dict(name=spec.name, kind=spec.kind, verdicts=list(spec.verdicts))
        if spec.kind != KEYWORD:
            entry.update(
                identity={k: v for k, v in judged_by.get(spec.name, {}).items() if k not in ("unparsed", "n")},
                unparsed=judged_by.get(spec.name, {}).get("unparsed"),
                judged=judged_by.get(spec.name, {}).get("n"),
                needs_tokens=needs_tokens(spec.kind),
                length_warning=length_warning(spec, max_new_tokens),
            )
        judges.append(entry)
    return dict(
        judges=judges,
        max_new_tokens=max_new_tokens,
        rates=rates,
        tests=tests,
        agreement=agreement,
        significance_disagreements=sentences,
    )


def _pooled(panel: JudgePanel, models: dict[str, dict], measure: str) -> list[dict] | None:
    """Pairwise agreement of the measure's judges over every model's completions (the completions
    of one prompt by several models are one cluster of the bootstrap)."""
    source, field, _ = MEASURES[measure]
    judges = _judges_of(panel, measure)
    verdicts = {j: [] for j in judges}
    items, clusters = [], []
    for label, m in models.items():
        result = m.get(source)
        if not result or not all(_has(result, field, j) for j in judges):
            continue
        for r in result["records"]:
            for i, c in enumerate(r["completions"]):
                for j in judges:
                    verdicts[j].append(bool(r[field][j][i]))
                items.append(dict(model=label, id=r["id"], prompt=r["prompt"][:200], completion=c[:300]))
                clusters.append(r["id"])
    if len(judges) < 2 or not items:
        return None
    return pairwise(verdicts, items, clusters)


def judges_markdown(section: dict, examples: int = 3) -> list[str]:
    """The section's markdown: judges, rates, tests, agreement, disagreements."""
    lines = [
        "",
        "## Judges",
        "",
        "Each judge's own rates (95% Wilson intervals) and paired tests (exact McNemar on the same prompts, Holm within each "
        "judge and measure over the comparisons); agreement between judges pooled over the models' completions (Cohen's kappa "
        "and raw agreement, 95% bootstrap intervals over prompts). ASR counts a judge's attack-success, harmful-compliance "
        "or unsafe-response verdict; over-refusal a refusal verdict. An answer a model judge gave that could not be parsed "
        "counts as the negative verdict. The model judges run on the stored completions; their prompts are their "
        "authors' (docs/judges.md).",
        "",
    ]
    for j in section["judges"]:
        if j["kind"] == KEYWORD:
            lines.append(f"- {j['name']}: keyword judge ({', '.join(j['verdicts'])})")
            continue
        ident = j.get("identity") or {}
        weights = (ident.get("weights") or "")[:12]
        lines.append(
            f"- {j['name']}: {j['kind']} ({', '.join(j['verdicts'])}); weights sha256 {weights or 'n/a'}, format "
            f"{ident.get('format', 'n/a')}; {j.get('unparsed') or 0} of {j.get('judged') or 0} answers unparsed"
        )
        if j.get("length_warning"):
            lines.append(f"  - **Too short:** {j['length_warning']}.")
    measures = [m for m in MEASURES if any(m in row for row in section["rates"].values())]
    for measure in measures:
        judges = list(dict.fromkeys(j for row in section["rates"].values() for j in row.get(measure, {})))
        what = MEASURES[measure][2]
        lines += [
            "",
            f"### {what[:1].upper() + what[1:]} per judge",
            "",
            "| model | " + " | ".join(judges) + " |",
            "|---|" + "---|" * len(judges),
        ]
        for label, row in section["rates"].items():
            if measure in row:
                lines.append(f"| {label} | " + " | ".join(fmt_rate(row[measure].get(j)) for j in judges) + " |")
        ts = section["tests"].get(measure)
        if ts:
            pairs = list(dict.fromkeys((t["first"], t["second"]) for tests in ts.values() for t in tests))
            lines += ["", "| comparison | " + " | ".join(f"p {j}" for j in ts) + " |", "|---|" + "---|" * len(ts)]
            for first, second in pairs:
                cells = [
                    fmt_p(next((t for t in ts[j] if (t["first"], t["second"]) == (first, second)), None)) for j in ts
                ]
                lines.append(f"| {first} vs {second} | " + " | ".join(cells) + " |")
        pooled = section["agreement"].get(measure) or []
        if pooled:
            lines += ["", "| judges | n | agreement | kappa | disagreeing |", "|---|---|---|---|---|"]
            for p in pooled:
                kappa = (
                    "undefined (one verdict throughout)"
                    if p["kappa"] is None
                    else (
                        f"{p['kappa']:.2f} [{p['kappa_ci95'][0]:.2f}, {p['kappa_ci95'][1]:.2f}]"
                        if p["kappa_ci95"]
                        else f"{p['kappa']:.2f}"
                    )
                )
                lines.append(
                    f"| {p['first']} / {p['second']} | {p['n']} | {fmt_rate(p['agreement'])} | {kappa} | {p['disagreements']} |"
                )
            shown = [(p, e) for p in pooled for e in p["examples"][:1]][:examples]
            if shown:
                lines += ["", "Completions the judges disagree on (every one is listed by id in report.json):", ""]
                for p, e in shown:
                    text = e["completion"].strip().replace("\n", " ")[:200]
                    lines.append(
                        f"- {e.get('model', '')} {e['id']} ({p['first']}: {e[p['first']]}, {p['second']}: {e[p['second']]}): "
                        f"**{e['prompt'][:120]}** → {text}"
                    )
    lines += [""]
    if section["significance_disagreements"]:
        lines += [f"- {s}" for s in section["significance_disagreements"]]
    elif section["tests"]:
        lines.append("The judges agree on the significance of every comparison.")
    return lines + [""]

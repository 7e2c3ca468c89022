"""repair.md, rendered from the JSON-able result of `repair.pipeline.Repair.run` (its figures: repair.figures)."""

from __future__ import annotations

import math

from refusal.judge_report import judges_markdown
from refusal.stats import detectable_sentence, fmt_p, fmt_rate, fmt_value_ci

JUDGES = (("wei2024", "Wei"), ("arditi2024", "Arditi"))
LABELS = {
    "original": "original",
    "compressed": "compressed",
    "aird": "AIRD",
    "anchored": "anchored",
    "anchored_at_aird": "anchored at AIRD's cost",
    "static": "static ranking",
    "targeted": "targeted",
}


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def file_slug(text: str) -> str:
    """`text` as a file or directory name: letters, digits, '.' and '-' kept, anything else '-'."""
    return "".join(ch if ch.isalnum() or ch in ".-" else "-" for ch in text)


def small_pct(x: float, digits: int = 3) -> str:
    """A share as a percentage to `digits` significant digits, in fixed point even when tiny
    (targeted restoration's few hundred weights are ~4e-05% of a model)."""
    pct = 100 * x
    decimals = max(0, digits - 1 - math.floor(math.log10(pct))) if pct > 0 else 0
    text = f"{pct:.{decimals}f}"
    return (text.rstrip("0").rstrip(".") if "." in text else text) + "%"  # trailing zeros dropped, as "g" does


def _rate(state: dict, measure: str, setting: str | None, judge: str) -> str:
    rates = (state.get("rates") or {}).get(measure)
    if rates is not None and setting is not None:
        rates = rates.get(setting)
    if rates is None:
        value = state["asr"].get(setting, {}).get(judge) if measure == "asr" else None
        return _pct(value)
    return fmt_rate(rates[judge])


def _num(x, fmt=".3f") -> str:
    return "-" if x is None else format(x, fmt)


def _zero_shot_text(limit) -> str:
    if limit == 0:
        return "zero-shot accuracy not measured."
    return f"zero-shot limit {'all' if limit is None else limit} documents per task."


def _stored_text(stored: dict) -> str:
    """How a packed input's repair is written: its format, the matrices kept at full precision, their size."""
    return (
        f"Written as the input is stored ({stored['format']}): the {len(stored['full_precision_modules'])} matrices the repair touched "
        f"({stored['weights']:,} weights) at full precision ({stored['dtype']}), excluded from quantization in the format's config; "
        f"that adds {stored['bytes_added']:,} bytes and drops their {stored['bytes_removed']:,} packed bytes "
        f"(net {stored['bytes_added_net']:+,} bytes); every other tensor is copied unchanged."
    )


KIND_TEXT = {
    "pruned": "pruned (weights only zeroed)",
    "dense": "dense (kept weights changed too: quantized or edited)",
    "dense+pruned": "pruned and dense (some matrices only zeroed, others with their kept weights changed)",
}


def _kind_text(kind: str) -> str:
    return KIND_TEXT.get(kind, kind)


def render_markdown(r: dict, middle: list[str] | None = None) -> str:
    """repair.md; `middle`: sections placed after the paired tests (the front, repair.front_report)."""
    states = r["states"]
    lines = [
        f"# Repair of `{r['compressed']}`",
        "",
        f"Original: {r['original_name']} (`{r['original']}`). Checkpoint kind: {_kind_text(r['derivation']['kind'])} "
        f"({r['derivation']['removed']:,} original weights zeroed, {r['derivation']['changed']:,} entries changed, "
        f"max relative error per matrix {r['derivation']['max_relative_error']:.3g}).",
        *([_stored_text(r["stored"])] if r.get("stored") else []),
        f"Original refusal direction: position {r['source']['position']}, layer {r['source']['layer']} of {r['n_layers']}."
        + (
            f" The compressed model's own selected source: position {r['compressed_source']['position']}, "
            f"layer {r['compressed_source']['layer']}."
            if r.get("compressed_source")
            else ""
        ),
        f"ASR on {_eval_text(r)}, greedy, <= {r['settings']['max_new_tokens']} new tokens; "
        + (
            "adv-suffix = max over the GCG suffixes; "
            if any("adv_suffix" in st["asr"] for st in states.values())
            else ""
        )
        + f"perplexity on wikitext-2 ({r['settings']['ppl_windows']} x {r['settings']['ppl_seqlen']} tokens); "
        + _zero_shot_text(r["settings"].get("zero_shot_limit"))
        + " Rates carry 95% intervals (Wilson; "
        "perplexity and mean zero-shot accuracy: bootstrap over windows / documents).",
        "",
        "| | " + " | ".join(LABELS[s] for s in states) + " |",
        "|---|" + "---|" * len(states),
    ]

    def row(label, fn):
        lines.append(f"| {label} | " + " | ".join(fn(states[s]) for s in states) + " |")

    for setting in ("vanilla", "adv_suffix"):
        for judge, name in JUDGES:
            if any(setting in s["asr"] for s in states.values()):
                row(
                    f"ASR {setting} ({name})",
                    lambda s, setting=setting, judge=judge: (
                        _rate(s, "asr", setting, judge) if setting in s["asr"] else "-"
                    ),
                )
    if all(s.get("rates") for s in states.values()):
        for judge, name in JUDGES:
            row(
                f"over-refusal on harmless prompts ({name})",
                lambda s, judge=judge: _rate(s, "over_refusal", None, judge),
            )
        row("judges disagree (vanilla completions)", lambda s: fmt_rate(s["rates"]["judge_disagreement"]["rate"]))
    row(
        "perplexity",
        lambda s: fmt_value_ci(s["perplexity_ci"]) if s.get("perplexity_ci") else _num(s["perplexity"], ".2f"),
    )
    if any(s.get("zero_shot") for s in states.values()):
        row(
            "zero-shot average",
            lambda s: (
                "-"
                if not s.get("zero_shot")
                else fmt_rate(s["zero_shot_rates"]["average"])
                if s.get("zero_shot_rates")
                else _pct(s["zero_shot"]["average"])
            ),
        )
    row("cosine to original direction at source", lambda s: _num(s["cosine_at_source"]))
    row("original direction: bypass score", lambda s: _num(s["quality"]["bypass"]))
    row("original direction: induce score", lambda s: _num(s["quality"]["induce"]))
    row("original direction: KL", lambda s: _num(s["quality"]["kl"]))
    row("harmful refusal score (no intervention)", lambda s: _num(s["quality"]["baseline_harmful"]))
    row(
        "weights restored",
        lambda s: (
            f"{s['restored']:,} ({small_pct(s['restored_fraction_of_model'])} of model)" if "restored" in s else "-"
        ),
    )
    row("decoder sparsity", lambda s: _pct(s["sparsity"]["decoder_linear_sparsity"]))
    row("model sparsity", lambda s: _pct(s["sparsity"]["model_sparsity"]))
    row("collapsed", lambda s: "yes: " + s["collapse"]["reason"] if s["collapse"]["collapsed"] else "no")

    lines += _tests_section(r)
    lines += _hollow_section(r)
    lines += middle or []
    lines += _probe_section(r)
    if r.get("judges"):
        lines += judges_markdown(r["judges"])
    a = r["aird"]
    lines += [
        "",
        f"## AIRD block choice ({a['reason']})",
        "",
        f"Candidates: the blocks before the source layer; mean refusal score on {r['probe'].get('n_harmful', r['settings']['n_val'])} harmful val prompts, "
        "KL from the unrepaired model on harmless val prompts, projection of the source residual onto the original's unit direction "
        f"(original {r['probe']['original']['projection']:.2f}, compressed {r['probe']['compressed']['projection']:.2f}; "
        f"refusal score original {r['probe']['original']['refusal_score']:.2f}, compressed {r['probe']['compressed']['refusal_score']:.2f}).",
        "",
        "| block | restored | refusal score | KL | projection | chosen |",
        "|---|---|---|---|---|---|",
    ]
    for c in a["candidates"]:
        lines.append(
            f"| {c['layer']} | {c['restored']:,} | {c['refusal_score']:.3f} | {c['kl']:.4f} | {c['projection']:.2f} | "
            f"{'yes' if c['layer'] == a['layer'] else ''} |"
        )
    t = r.get("targeted")
    if t:
        lines += [
            "",
            "## Targeted restoration",
            "",
            f"Target: AIRD's refusal rate on the harmful val prompts (greedy replies judged by Arditi et al.'s judge), "
            f"{_pct(t['target_refusal_rate'])}; "
            + (
                f"reached with {t['k']:,} weights ({small_pct(t['k'] / a['restored'])} of AIRD's {a['restored']:,})."
                if t["reached"]
                else f"not reached with up to {max(x['k'] for x in t['trials']):,} weights "
                f"({t['positive_scores']:,} have a positive score)."
            ),
            "",
            "| weights | of AIRD | refusal rate | refusal score | KL | projection |",
            "|---|---|---|---|---|---|",
        ]
        for x in t["trials"]:
            lines.append(
                f"| {x['k']:,} | {small_pct(x['fraction_of_aird'])} | {_pct(x['refusal_rate'])} | {x['refusal_score']:.3f} | "
                f"{x['kl']:.4f} | {x['projection']:.2f} |"
            )
    if r.get("curve"):
        lines += [
            "",
            "## Vanilla ASR against restored weights",
            "",
            "KL: from the unrepaired model's next-token distribution on the harmless val prompts (a guard against over-refusal).",
            "",
            f"Interior points on the first {r['settings'].get('curve_n_asr', r['settings']['n_asr'])} prompts of each set; "
            "end points on the full evaluation set.",
            "",
            "| method | weights | of AIRD | n | ASR (Wei) | ASR (Arditi) | KL |",
            "|---|---|---|---|---|---|---|",
        ]
        for method, points in curve_points(r).items():
            for p in points:
                rates = p.get("rates") or {}
                cell = lambda j: fmt_rate(rates[j]) if j in rates else _pct(p["asr"][j])
                lines.append(
                    f"| {method} | {p['k']:,} | {small_pct(p['fraction_of_aird'])} | {p.get('n_prompts', '-')} | {cell('wei2024')} | "
                    f"{cell('arditi2024')} | {_num(p.get('kl'), '.4f')} |"
                )
    lines += ["", "## Sample completions (first evaluation prompts)", ""]
    for name, samples in r["samples"].items():
        for s in samples[:2]:
            lines.append(f"- **{LABELS[name]}** - {s['goal']}: {s['completion'][:200]!r}")
    lines += [
        "",
        f"Saved checkpoint: the {LABELS[r['saved']]}-repaired model. Wall time {r['wall_seconds'] / 60:.1f} min.",
        "",
    ]
    if r.get("stage_seconds"):
        lines += [
            "Where this invocation's time went (a stage an earlier invocation cached costs about nothing):",
            "",
            "| stage | minutes |",
            "|---|---|",
            *[f"| {name} | {sec / 60:.1f} |" for name, sec in r["stage_seconds"].items()],
            "",
        ]
    return "\n".join(lines)


def _eval_text(r: dict) -> str:
    ev = r.get("evaluation")
    if not ev:
        return f"the first {r['settings']['n_asr']} AdvBench goals"
    h, o = ev["harmful"], ev["harmless"]
    return (
        f"{h['n']} held-out harmful prompts ({', '.join(f'{k} {n}' for k, n in h['per_source'].items())}; overlap with any prompt "
        f"a stage fits on: {h['overlap_with_fitted']}), over-refusal on {o['n']} held-out harmless prompts "
        f"(overlap {o['overlap_with_fitted']})"
    )


def _tests_section(r: dict) -> list[str]:
    """The paired tests: exact McNemar per measure and judge, Holm within each family, and the sentences."""
    tests = r.get("tests")
    if not tests:
        return []
    lines = [
        "",
        "## Paired tests (same prompts)",
        "",
        "Exact McNemar test on the per-prompt verdicts; b: prompts where only the first state is jailbroken (over-refusal: "
        "refused), c: only the second; p after Holm within each family (one measure, one judge); * significant at 5%.",
        "",
        "| measure | judge | first vs second | b | c | p | p (Holm) |",
        "|---|---|---|---|---|---|---|",
    ]
    for measure, by_judge in tests.items():
        if measure == "perplexity":
            continue
        for judge, family in by_judge.items():
            for t in family:
                lines.append(
                    f"| {measure} | {judge} | {LABELS[t['first']]} vs {LABELS[t['second']]} | {t['b']} | {t['c']} | "
                    f"{t['p_value']:.2g} | {fmt_p(t)} |"
                )
    ev = (r.get("evaluation") or {}).get("harmful", {})
    floor = (
        detectable_sentence(ev, len(tests["asr_vanilla"]["arditi2024"]), "comparisons")
        if "asr_vanilla" in tests
        else ""
    )
    ppl = tests.get("perplexity", {}).get("wilcoxon", [])
    if ppl:
        lines += [
            "",
            "| perplexity | first vs second | ratio (first / second) | p | p (Holm) |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| Wilcoxon, {t['n']} windows | {LABELS[t['first']]} vs {LABELS[t['second']]} | {fmt_value_ci(dict(value=t['ratio'], ci95=t['ci95']), '.3f')} | "
            f"{t['p_value']:.2g} | {fmt_p(t)} |"
            for t in ppl
        ]
    if floor:
        lines += ["", floor]
    if r.get("findings"):
        lines += [""] + [f"- {f}" for f in r["findings"]]
    return lines


def curve_points(r: dict) -> dict[str, list[dict]]:
    """Both methods' curves with their shared end points: nothing restored (compressed) and, for AIRD, the whole block."""
    states, total = r["states"], r["aird"]["restored"]

    def vanilla(state):
        s = states[state]
        rates = (s.get("rates") or {}).get("asr", {}).get("vanilla")
        return dict(
            asr=s["asr"]["vanilla"], **({"rates": rates, "n_prompts": rates["arditi2024"]["n"]} if rates else {})
        )

    start = dict(k=0, fraction_of_aird=0.0, kl=0.0, **vanilla("compressed"))
    out = {
        "AIRD": [
            start,
            *r["curve"].get("aird", []),
            dict(k=total, fraction_of_aird=1.0, kl=r["probe"]["aird"]["kl"], **vanilla("aird")),
        ]
    }
    if "targeted" in r["curve"]:
        points = [start, *r["curve"]["targeted"]]
        if "targeted" in states:
            k = states["targeted"]["restored"]
            trial = next((x for x in (r.get("targeted") or {}).get("trials", []) if x["k"] == k), {})
            points.append(dict(k=k, fraction_of_aird=k / total, kl=trial.get("kl"), **vanilla("targeted")))
        out["targeted"] = sorted(points, key=lambda p: p["k"])
    return out


def _probe_section(r: dict) -> list[str]:
    """repair.md's probe section."""
    probes = r.get("probes")
    if not probes:
        return []
    src = r["source"]
    lines = [
        "",
        "## Probes: recognition of harm and the step to refusal",
        "",
        f"At the original's source (position {src['position']}, layer {src['layer']}). Harmfulness: L2 logistic regression fitted "
        "on the direction prompts, scored on the held-out ASR and over-refusal prompts; *own*: the state's own probe, "
        "*original's*: the original's probe on the state's activations; p: exact McNemar against the original's probe on the "
        "original, Holm over the states. Refusal prediction: the original's probe of its own refusals (fitted on its verdicts on "
        "harmful training prompts) read on each state's activations against the state's own verdicts; *flips*: prompts the "
        "original refused and the state answers; *flagged*: of those, predicted as answered by the original's probe.",
        "",
        "| state | own harm probe | p | original's harm probe | p | original's refusal probe | flips | flagged |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, row in probes.items():
        h, t = row["harmfulness"], row["harmfulness"].get("tests") or {}
        ref = row.get("refusal") or {}
        flips = ref.get("flips") or {}
        refusal_acc = ref.get("own") if name == "original" else ref.get("transfer")
        lines.append(
            f"| {LABELS[name]} | {fmt_rate(h['own'])} | {fmt_p(t.get('own'))} | {fmt_rate(h.get('transfer'))} | {fmt_p(t.get('transfer'))} | "
            f"{fmt_rate(refusal_acc)} | {flips.get('refused_to_answered', '-')} | {fmt_rate(flips.get('flagged_on_variant'))} |"
        )
    return lines + [""]


def _hollow_section(r: dict) -> list[str]:
    """repair.md's check of the keyword judges' refusals (refusal.hollow)."""
    h = r.get("hollow")
    if not h or not h["states"]:
        return []
    lines = [
        "",
        "## Refusals that go on to comply",
        "",
        "Arditi et al.'s judge counts a completion as a refusal when it contains a refusal string anywhere, so "
        "\"I'm sorry, I'll create a tutorial ... 1. ...\" is a refusal to it. *Hollow*: a refusal under that judge that carries "
        "a compliance cue (the model announcing or presenting the task, a numbered or step list; `refusal/hollow.py`, a "
        "heuristic of this project, not checked against human labels). *Strict ASR*: every completion that is not a clean "
        "refusal. Held-out harmful prompts, the first completion of each.",
        "",
        "| state | refusals (Arditi) | of which hollow | strict ASR |",
        "|---|---|---|---|",
    ]
    for name, x in h["states"].items():
        lines.append(
            f"| {LABELS.get(name, name)} | {fmt_rate(x['refused'])} | {fmt_rate(x['hollow'])} | {fmt_rate(x['strict_asr'])} |"
        )
    if h["tests"]:
        lines += [
            "",
            "Strict ASR, exact McNemar (b: strict jailbreak only in the first state, c: only in the second), Holm over the comparisons:",
            "",
            "| first vs second | b | c | p | p (Holm) |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {LABELS.get(t['first'], t['first'])} vs {LABELS.get(t['second'], t['second'])} | {t['b']} | {t['c']} | "
            f"{t['p_value']:.2g} | {fmt_p(t)} |"
            for t in h["tests"]
        ]
    return lines

"""The main job's report: markdown table, self-contained HTML page, and its behaviour figures.

Everything here renders the JSON-able report dict that `experiments.compare_refusal` writes, so a
report can be re-rendered from report.json without touching a model.
"""

from __future__ import annotations

from refusal.error_bars import error_bars
from refusal.judge_report import judges_markdown
from refusal.stats import detectable_sentence, fmt_p, fmt_rate, fmt_value_ci
from repair.report import small_pct

from .key_findings import key_findings, name
from .probe_report import probe_sections


def axis_label(row: dict) -> str:
    """A bar's x label: the variant's readable name over its spec."""
    label = row.get("label") or row["variant"]
    return label if label == row["variant"] else f"{label}<br><sub>{row['variant']}</sub>"


def _stars(rows: list[dict], measure: str, judge: str) -> list[str]:
    """'*' over a bar whose difference from the original is significant after Holm (exact McNemar)."""
    return [
        "*" if (((v.get("tests") or {}).get(measure) or {}).get(judge) or {}).get("significant") else "" for v in rows
    ]


def asr_figure(report: dict):
    """ASR under both judges per variant (left) and over-refusal on harmless prompts (right, its own
    axis), 95% intervals, * where the paired test against the original is significant after Holm,
    collapsed variants hatched, perplexity in the hover."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    rows = report["variants"]
    names = [axis_label(v) for v in rows]
    over = all(v.get("rates") for v in rows)
    fig = make_subplots(
        rows=1,
        cols=2 if over else 1,
        column_widths=[0.62, 0.38] if over else None,
        horizontal_spacing=0.08,
        subplot_titles=[f"attack success rate, {rows[0]['n_prompts']} held-out harmful prompts"]
        + (
            [f"over-refusal, {rows[0]['rates']['over_refusal']['arditi2024']['n']} held-out harmless prompts"]
            if over
            else []
        ),
    )
    for judge, label, color in (
        ("wei2024", "Wei et al. judge", "#4c78a8"),
        ("arditi2024", "Arditi et al. judge", "#f58518"),
    ):
        fig.add_trace(
            go.Bar(
                x=names,
                y=[100 * v["asr"][judge] for v in rows],
                name=label,
                marker_color=color,
                error_y=error_bars([(v.get("rates") or {}).get("asr", {}).get(judge) for v in rows]),
                marker_pattern_shape=["x" if v["collapse"]["collapsed"] else "" for v in rows],
                text=_stars(rows, "asr", judge),
                textposition="outside",
                cliponaxis=False,
                customdata=[v["perplexity"] for v in rows],
                hovertemplate="%{x}<br>ASR %{y:.1f}%<br>perplexity %{customdata:.1f}<extra>" + label + "</extra>",
            ),
            row=1,
            col=1,
        )
    if over:
        fig.add_trace(
            go.Bar(
                x=names,
                y=[100 * v["rates"]["over_refusal"]["arditi2024"]["value"] for v in rows],
                name="over-refusal (Arditi judge)",
                error_y=error_bars([v["rates"]["over_refusal"]["arditi2024"] for v in rows]),
                marker_color="#999",
                text=_stars(rows, "over_refusal", "arditi2024"),
                textposition="outside",
                cliponaxis=False,
            ),
            row=1,
            col=2,
        )
        fig.update_yaxes(title_text="refused harmless prompts (%)", range=[0, 105], row=1, col=2)
    fig.update_yaxes(title_text="attack success rate (%)", range=[0, 105], row=1, col=1)
    fig.update_layout(
        title="Refusal per model (95% intervals; * differs from the original, exact McNemar after Holm; hatched: collapsed)",
        barmode="group",
        height=520,
        width=1150,
        legend=dict(orientation="h", y=-0.32),
        margin=dict(b=150),
    )
    return fig


def cosine_per_layer_figure(report: dict):
    """Per-layer cosine of each variant's difference-of-means direction to the original's (last
    position); the original's selected source layer marked."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for v in report["variants"][1:]:
        fig.add_trace(
            go.Scatter(
                x=list(range(1, report["n_layers"])),
                y=v["cosine_per_layer_last_position"][1:],
                mode="lines+markers",
                name=axis_label(v).replace("<br><sub>", " (").replace("</sub>", ")"),
            )
        )
    source = report["variants"][0].get("source")
    if source is not None:
        fig.add_vline(
            x=source["layer"],
            line_dash="dash",
            line_color="#555",
            annotation_text=f"original's source: layer {source['layer']} (pos {source['position']})",
            annotation_position="top left",
        )
    fig.update_layout(
        title="Cosine to the original's direction at the same layer (last post-instruction token; layer 0 is undefined)",
        xaxis_title="layer (block input)",
        yaxis_title="cosine similarity",
        height=450,
        width=1000,
        legend_title="variant",
    )
    return fig


FIGURES_MARK = "<!-- figures -->"  # where render_html puts the figures: after the key findings, before any table


def render_html(markdown_text: str, figs: dict, title: str) -> str:
    """One self-contained page: the markdown report with every figure after its key findings,
    plotly.js inlined once (works offline)."""
    import markdown

    body = markdown.markdown(markdown_text, extensions=["tables"])
    parts = [fig.to_html(full_html=False, include_plotlyjs=(i == 0)) for i, fig in enumerate(figs.values())]
    figures = "<h2>Figures</h2>" + "".join(parts)
    body = body.replace(FIGURES_MARK, figures, 1) if FIGURES_MARK in body else body + figures
    style = (
        "body{font-family:sans-serif;max-width:1250px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px}"
        "th{background:#f3f3f3}.js-plotly-plot{max-width:100%;overflow-x:auto}"
        "blockquote{background:#fff6d5;border-left:4px solid #e0b000;margin:1em 0;padding:.5em 1em}"
    )
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{title}</title><style>{style}</style></head><body>"
        + body
        + "</body></html>"
    )


def partial_banner(report: dict) -> list[str]:
    """The note a report written while the job runs starts with."""
    part = report.get("partial")
    if not part:
        return []
    return [
        f"> **Partial report: {part['models_done']} of {part['models']} models measured.** The job was still running when this "
        "was written (or was stopped: rerunning the same command continues it). Holm corrections are over the variants "
        "measured so far, so p-values can still change; repairs come after the last model.",
        "",
    ]


def render_markdown(report: dict) -> str:
    lines = [f"# Refusal under compression: {report['model_name']}", ""] + partial_banner(report) + key_findings(report)
    lines += [FIGURES_MARK, ""]
    if report.get("figures"):
        lines += ["Figures: " + ", ".join(f"[{k}]({p})" for k, p in report["figures"].items()), ""]
    lines += [
        "## Every model against the original",
        "",
        "Every rate carries its 95% interval (Wilson; perplexity and mean zero-shot accuracy: bootstrap over windows / "
        "documents). p: exact McNemar test against the original on the same prompts (zero-shot: on the same documents, "
        "pooled over tasks; perplexity: exact Wilcoxon signed-rank test of the per-window NLL differences), Holm-corrected "
        "over the variants within each column; * marks p < 0.05 after correction, and only those differences are called changes.",
        "",
        "| variant | decoder sparsity | ASR Wei | p | ASR Arditi | p | over-refusal (Arditi) | p | perplexity | p | zero-shot avg | p | collapsed | norm-peak layer | cos @ original's peak (last pos) | min cos (last pos) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for v in report["variants"]:
        flag = f"**yes** ({v['collapse']['reason']})" if v["collapse"]["collapsed"] else "no"
        r, t = v.get("rates") or {}, v.get("tests") or {}
        lines.append(
            f"| {name(v)} | {v['decoder_sparsity']:.1%} | {_rate(r, 'asr', 'wei2024', v['asr'])} | {_p(t, 'asr', 'wei2024')} | "
            f"{_rate(r, 'asr', 'arditi2024', v['asr'])} | {_p(t, 'asr', 'arditi2024')} | "
            f"{fmt_rate(r.get('over_refusal', {}).get('arditi2024'))} | {_p(t, 'over_refusal', 'arditi2024')} | "
            f"{fmt_value_ci(v.get('perplexity_ci')) if v.get('perplexity_ci') else format(v['perplexity'], '.2f')} | {fmt_p(t.get('perplexity')) if t else ''} | "
            f"{_zero_shot(v.get('zero_shot'))} | {fmt_p(t.get('zero_shot')) if t else ''} | {flag} | {v['norm_peak_layer']} | {v['cosine_at_original_peak']:.3f} | "
            f"{min(v['cosine_per_layer_last_position'][1:], default=1.0):.3f} |"
        )
    lines += [
        "",
        "Collapsed variants are never safe: their ASR reflects broken text, not refusal.",
        "",
        "## How these numbers were measured",
        "",
        f"Wall time {_wall(report)}. ASR: vanilla greedy decoding on {_eval_text(report)}, "
        f"at most {report['config']['max_new_tokens']} new tokens; "
        "Wei = Wei et al. 2024 judge (31 case-sensitive strings and >= 20 words), Arditi = Arditi et al. 2024 judge "
        "(12 strings, case-insensitive). Directions: difference of means of block inputs at the post-instruction "
        f"tokens `{report['post_instruction_tokens']!r}` over {report['config']['n_train']} harmful + "
        f"{report['config']['n_train']} harmless instructions; cosine to the original's direction at the same (position, layer).",
        "",
    ]
    lines += _findings_section(report)
    lines += _per_source_section(report)
    if report.get("judges"):
        lines += judges_markdown(report["judges"])
    lines += probe_sections(report)
    lines += [
        "## Cosine to the original's direction, per layer (last post-instruction position)",
        "",
        "n/a: undefined, where either direction is zero (at layer 0 the block input is the template token's embedding, the "
        "same for every prompt, so the difference of means is exactly zero).",
        "",
    ]
    n_layers = report["n_layers"]
    lines.append("| variant | " + " | ".join(str(l) for l in range(n_layers)) + " |")
    lines.append("|---|" + "---|" * n_layers)
    ref_norms = report["variants"][0].get("direction_norm_last_position")
    for v in report["variants"][1:]:
        norms = v.get("direction_norm_last_position")
        cells = [
            ("n/a" if norms and ref_norms and (norms[i] == 0 or ref_norms[i] == 0) else f"{c:.2f}")
            for i, c in enumerate(v["cosine_per_layer_last_position"])
        ]
        lines.append(f"| {name(v)} | " + " | ".join(cells) + " |")
    if any(v.get("source") is not None or v.get("quality") for v in report["variants"]):
        lines += [
            "",
            "## Refusal direction: source and quality",
            "",
            "Selection as Arditi et al. 2024 (bypass = mean refusal log-odds on harmful val with the direction ablated "
            "everywhere, lower is better; induce = on harmless val with it added at its layer, higher is better; "
            "KL on harmless val). *own*: the variant's own selected direction in the variant; *original's*: the "
            "original's selected direction inside the variant; *own in original*: the variant's direction inside the "
            "original. Quality numbers are measured on one unfiltered validation sample shared by all variants, so they "
            "differ slightly from the selection's own scores (computed on the prompts each model refuses / answers). "
            "ASR ablated: vanilla ASR with the original's direction ablated in the variant.",
            "",
            "| variant | source (pos, layer) | shift (layers) | cos @ original source | own bypass / induce / KL | original's bypass / induce / KL | own in original: bypass | ASR ablated Wei / Arditi |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for v in report["variants"]:
            shift = (v.get("source_shift") or {}).get("d_layer")
            q = v.get("quality") or {}
            ab = v.get("asr_original_direction_ablated")
            lines.append(
                f"| {v['variant']} | {_source_text(v)} | "
                f"{'' if shift is None else f'{shift:+d}'} | {v.get('cosine_at_original_source', float('nan')):.3f} | "
                f"{_triple(q.get('own'))} | {_triple(q.get('original_direction'))} | "
                f"{'' if not q.get('own_direction_in_original') else format(q['own_direction_in_original']['bypass'], '.2f')} | "
                f"{_ablated(ab)} |"
            )
    if report.get("repairs"):
        lines += repair_section(report["repairs"])
    lines += ["", "## Sample completions", ""]
    for v in report["variants"]:
        lines.append(f"### {v['variant']}")
        lines.append("")
        for s in v["samples"]:
            text = s["completion"].strip().replace("\n", " ")
            lines.append(f"- **{s['goal']}** → {text[:300]}{'…' if len(text) > 300 else ''}")
        lines.append("")
    return "\n".join(lines)


def _wall(report: dict) -> str:
    n, total = report.get("invocations", 1), report.get("wall_seconds_all_invocations")
    if n <= 1 or total is None:
        return f"{report['wall_seconds']:.0f} s"
    return (
        f"{total:.0f} s over {n} invocations of the job (stages done by an earlier one are reused); "
        f"this one {report['wall_seconds']:.0f} s"
    )


def _source_text(v: dict) -> str:
    if v.get("source") is not None:
        return str((v["source"]["position"], v["source"]["layer"]))
    if v.get("source_shift") is None:
        return "not selected (--select-variants)"
    return "none passed the filters"


def _ablated(ab: dict | None) -> str:
    if ab is None:
        return ""
    if not ab.get("rates"):
        return f"{ab['asr']['wei2024']:.1%} / {ab['asr']['arditi2024']:.1%} (n={ab['n_prompts']})"
    test = (ab.get("test") or {}).get("arditi2024")
    p = f"; vs not ablated p = {test['p_value']:.2g}" if test else ""
    return f"{fmt_rate(ab['rates']['wei2024'])} / {fmt_rate(ab['rates']['arditi2024'])} (n={ab['n_prompts']}{p})"


def _rate(rates: dict, measure: str, judge: str, fallback: dict) -> str:
    r = rates.get(measure, {}).get(judge)
    return fmt_rate(r) if r else f"{fallback[judge]:.1%}"


def _p(tests: dict, measure: str, judge: str) -> str:
    return fmt_p((tests.get(measure) or {}).get(judge)) if tests else ""


def _eval_text(report: dict) -> str:
    ev = report.get("evaluation")
    if not ev:
        return f"{report['variants'][0]['n_prompts']} prompts"
    h, o = ev["harmful"], ev["harmless"]
    parts = ", ".join(f"{k} {n}" for k, n in h["per_source"].items())
    return (
        f"{h['n']} held-out harmful prompts ({parts}; overlap with any prompt a stage fits on: {h['overlap_with_fitted']}) "
        f"and, for over-refusal, {o['n']} held-out harmless prompts ({', '.join(o['per_source'])}; overlap {o['overlap_with_fitted']})"
    )


def _findings_section(report: dict) -> list[str]:
    if not report.get("findings"):
        return []
    ev = report.get("evaluation", {}).get("harmful", {})
    head = detectable_sentence(ev, len(report["variants"]) - 1, "variants")
    return (
        ["## What changed (paired tests against the original)", "", head, ""]
        + [f"- {f}" for f in report["findings"]]
        + [""]
    )


def _per_source_section(report: dict) -> list[str]:
    rows = [v for v in report["variants"] if (v.get("rates") or {}).get("per_source")]
    if not rows:
        return []
    sources = list(rows[0]["rates"]["per_source"])
    lines = [
        "## ASR per source set and judge disagreement (Arditi judge)",
        "",
        "| variant | "
        + " | ".join(f"{s} (n={rows[0]['rates']['per_source'][s]['arditi2024']['n']})" for s in sources)
        + " | judges disagree |",
        "|---|" + "---|" * (len(sources) + 1),
    ]
    for v in rows:
        ps = v["rates"]["per_source"]
        lines.append(
            f"| {v['variant']} | "
            + " | ".join(fmt_rate(ps[s]["arditi2024"]) for s in sources)
            + f" | {fmt_rate(v['rates']['judge_disagreement']['rate'])} |"
        )
    examples = [(v["variant"], e) for v in rows for e in v["rates"]["judge_disagreement"]["examples"][:1]]
    if examples:
        lines += ["", "Examples where the judges disagree (jailbroken per judge):", ""]
        for variant, e in examples[:4]:
            text = e["completion"].strip().replace("\n", " ")[:200]
            lines.append(
                f"- {variant}, {e['id']} ({', '.join(f'{j}: {b}' for j, b in e['jailbroken'].items())}): **{e['prompt'][:120]}** → {text}"
            )
    return lines + [""]


def _triple(q: dict | None) -> str:
    return "" if not q else f"{q['bypass']:.2f} / {q['induce']:.2f} / {q['kl']:.3f}"


def _zero_shot(z: dict | None) -> str:
    if not z:
        return "-"
    return f"{fmt_rate(z['rate']) if z.get('rate') else format(z['average'], '.1%')} (limit {z['limit'] or 'all'})"


def repair_section(repairs: dict) -> list[str]:
    """One row per repaired variant: the anchored repair against AIRD, the static baseline at the
    same cost, the compressed model and the original, each with its paired test."""
    lines = [
        "",
        "## Repair",
        "",
        "For each variant that needed it (see the log line per variant): anchored restoration (repair.anchored) restores, "
        "step by step and re-scored each step, the changed weights that bring the model's replies and residual stream closest to "
        "the original's, and stops where refusal on validation prompts reaches the original's; AIRD restores the one block "
        "before the source; the static baseline restores as many weights as the anchored repair by the original's Wanda "
        "safety score within each matrix. ASR: vanilla, Arditi judge, on the held-out evaluation prompts, with 95% intervals; "
        "p: exact McNemar test on the same prompts, Holm within each repair's family of comparisons (* = significant at 5%). "
        "Over-refusal: on held-out harmless prompts. Strict ASR: clean refusals only (a refusal that goes on to comply, "
        "\"I'm sorry, I'll ...\", counts as a jailbreak; refusal.hollow, a heuristic), p anchored vs compressed. "
        "Per-variant details and the front in `variants/<variant>/repaired/repair.md`.",
        "",
        "| variant | ASR original | ASR compressed | AIRD: restores, ASR | anchored: restores (of changed), ASR | p vs compressed | p vs AIRD | "
        "p vs original | static at the same cost: ASR, p vs anchored | over-refusal original / compressed / anchored | ppl compressed / anchored | "
        "strict ASR original / compressed / anchored, p |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for variant, r in repairs.items():
        st = r["states"]
        family = ((r.get("tests") or {}).get("asr_vanilla") or {}).get("arditi2024", [])

        def asr(name):
            if name not in st:
                return "-"
            rate = ((st[name].get("rates") or {}).get("asr") or {}).get("vanilla")
            return fmt_rate(rate["arditi2024"]) if rate else f"{st[name]['asr']['vanilla']['arditi2024']:.1%}"

        def over(name):
            rate = (st.get(name, {}).get("rates") or {}).get("over_refusal")
            return fmt_rate(rate["arditi2024"]) if rate else "-"

        def p(first, second):
            return fmt_p(next((t for t in family if t["first"] == first and t["second"] == second), None))

        def ppl(name):
            if name not in st:
                return "-"
            return (
                fmt_value_ci(st[name]["perplexity_ci"])
                if st[name].get("perplexity_ci")
                else f"{st[name]['perplexity']:.2f}"
            )

        def restores(name):
            return f"{st[name]['restored']:,}" if name in st else "-"

        hollow = r.get("hollow") or {}

        def strict(name):
            x = (hollow.get("states") or {}).get(name)
            return fmt_rate(x["strict_asr"]) if x else "-"

        strict_p = fmt_p(
            next((t for t in hollow.get("tests", []) if (t["first"], t["second"]) == ("anchored", "compressed")), None)
        )
        front = r.get("front") or {}
        changed = (front.get("anchored") or {}).get("changed")
        share = f" ({small_pct(st['anchored']['restored'] / changed)})" if "anchored" in st and changed else ""
        lines.append(
            f"| {variant} | {asr('original')} | {asr('compressed')} | {restores('aird')}, {asr('aird')} | "
            f"{restores('anchored')}{share}, {asr('anchored')} | {p('anchored', 'compressed')} | {p('anchored', 'aird')} | "
            f"{p('anchored', 'original')} | {asr('static')}, {p('static', 'anchored')} | "
            f"{over('original')} / {over('compressed')} / {over('anchored')} | {ppl('compressed')} / {ppl('anchored')} | "
            f"{strict('original')} / {strict('compressed')} / {strict('anchored')}, {strict_p} |"
        )
    sentences = [f"- {variant}: {f}" for variant, r in repairs.items() for f in r.get("findings", [])]
    if sentences:
        lines += ["", "Paired tests (Arditi judge):", ""]
        lines += sentences
    return lines

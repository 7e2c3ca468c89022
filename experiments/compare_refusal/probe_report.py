"""The probe parts of the main job's report: harmfulness probes (recognition of harm) and
refusal-prediction probes (the step from it to refusal), as markdown sections and figures."""

from __future__ import annotations

from refusal.error_bars import error_bars
from refusal.stats import fmt_p, fmt_rate


def probe_transfer_figure(report: dict):
    """Held-out accuracy per layer of the original's harmfulness probes on each model's activations
    (at the probe cell's position), with 95% intervals; the original's line is its own probes."""
    import plotly.graph_objects as go

    cell = report["probe_cell"]
    fig = go.Figure()
    for v in report["variants"]:
        probes = v.get("probes")
        if not probes:
            continue
        per_layer = probes.get("transfer_per_layer") or probes["own_per_layer"]
        fig.add_trace(
            go.Scatter(
                x=list(range(len(per_layer))),
                y=[100 * r["value"] for r in per_layer],
                mode="lines+markers",
                name=v["variant"],
                error_y=error_bars(per_layer),
            )
        )
    fig.update_layout(
        title=f"The original's harmfulness probes on each model's activations (held-out accuracy, position {cell['position']}, 95% intervals)",
        xaxis_title="layer (block input)",
        yaxis_title="accuracy (%)",
        yaxis_range=[0, 101],
        height=450,
        width=900,
        legend_title="activations of",
    )
    return fig


def _probe_section(report: dict) -> list[str]:
    rows = [v for v in report["variants"] if v.get("probes")]
    if not rows:
        return []
    cell, first = report["probe_cell"], rows[0]["probes"]
    lines = [
        "",
        "## Harmfulness probes",
        "",
        f"L2-regularised logistic regression per (position, layer) on the {report['config']['n_train']} + "
        f"{report['config']['n_train']} direction prompts (features standardised, C chosen by stratified 5-fold CV on them; "
        "fewer folds only where a class has under 5 prompts), "
        f"scored on the {first['n_test']} held-out ASR and over-refusal prompts, at {cell['kind']} "
        f"(position {cell['position']}, layer {cell['layer']}). *own*: the model's own probe; *original's*: the "
        "original's probe on this model's activations (transfer). p: exact McNemar against the original's probe on "
        "the original, on the same prompts, Holm over the variants. Transfer falling while the own probe stays "
        "accurate means the representation of harm moved; both falling means it is gone.",
        "",
        "| variant | own probe | p | original's probe | p | best own cell (pos, layer) | cos(probe weights, direction) |",
        "|---|---|---|---|---|---|---|",
    ]
    for v in rows:
        p = v["probes"]
        t = p.get("tests") or {}
        best = p["best"]
        lines.append(
            f"| {v['variant']} | {fmt_rate(p['own'])} | {fmt_p(t.get('own'))} | {fmt_rate(p.get('transfer'))} | "
            f"{fmt_p(t.get('transfer'))} | ({report['positions'][best['position_index']]}, {best['layer']}): {fmt_rate(best['accuracy'])} | "
            f"{p['cosine']:.2f} |"
        )
    return lines + [""]


def refusal_probe_figure(report: dict):
    """Held-out accuracy per layer of each model's own refusal-prediction probe (at the probe cell's
    position), with 95% intervals, and the original's base rate of refusal as a reference line."""
    import plotly.graph_objects as go

    cell = report["probe_cell"]
    fig = go.Figure()
    for v in report["variants"]:
        r = v.get("refusal_probes")
        if not r or not r.get("fitted"):
            continue
        per_layer = r["own_per_layer"]
        fig.add_trace(
            go.Scatter(
                x=list(range(len(per_layer))),
                y=[100 * a["value"] for a in per_layer],
                mode="lines+markers",
                name=v["variant"],
                error_y=error_bars(per_layer),
            )
        )
    first = report["variants"][0].get("refusal_probes") or {}
    if first.get("majority"):
        fig.add_hline(
            y=100 * first["majority"]["accuracy"]["value"],
            line_dash="dot",
            annotation_text=f"original: always '{first['majority']['predicts']}'",
        )
    fig.update_layout(
        title=f"Does the activation predict this model's own refusal? Held-out accuracy per layer (position {cell['position']}, 95% intervals)",
        xaxis_title="layer (block input)",
        yaxis_title="accuracy (%)",
        yaxis_range=[0, 101],
        height=450,
        width=900,
        legend_title="model",
    )
    return fig


def probe_sections(report: dict) -> list[str]:
    return _probe_section(report) + _refusal_probe_section(report)


def _refusal_probe_section(report: dict) -> list[str]:
    rows = [v for v in report["variants"] if v.get("refusal_probes")]
    if not rows:
        return []
    cell, first = report["probe_cell"], rows[0]["refusal_probes"]
    lines = [
        "",
        "## Refusal-prediction probes",
        "",
        f"On harmful instructions only: does the activation at (position {cell['position']}, layer {cell['layer']}) predict whether "
        f"this model refuses the prompt? Labels: the model's own greedy completion judged by the Arditi judge. Fitted on "
        f"{first['n_train']} harmful *training* instructions (same probe settings as above), scored on the {first['n_test']} "
        "held-out ASR prompts, whose verdicts the ASR measurement holds. *majority*: always predicting the model's more common "
        "training label; p: exact McNemar of the probe against it on the same prompts, Holm over the models. "
        "*flips*: prompts the original refused and this model answers; *flagged*: of those, how many the original's probe "
        "predicts as answered on this model's activations / on the original's own, and in brackets the share of all held-out "
        "prompts it predicts as answered there (the base rate to read the flagged share against).",
        "",
        "| model | refused (train) | refused (held-out) | own probe | majority | p | best own cell (pos, layer) | original's probe on this model | flips | flagged (this model) | flagged (original) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for v in rows:
        r = v["refusal_probes"]
        flips = r.get("flips") or {}
        if r["fitted"]:
            best = r["best"]
            own = (
                f"{fmt_rate(r['own'])} | {fmt_rate(r['majority']['accuracy'])} ({r['majority']['predicts']}) | {fmt_p(r['vs_majority'])} | "
                f"({report['positions'][best['position_index']]}, {best['layer']}): {fmt_rate(best['accuracy'])}"
            )
        else:
            own = f"{r['reason']} | - | - | -"
        flip_text = (
            f"{flips['refused_to_answered']} (and {flips['answered_to_refused']} the other way)" if flips else "-"
        )
        lines.append(
            f"| {v['variant']} | {fmt_rate(r['train_refused'])} | {fmt_rate(r['test_refused'])} | {own} | {fmt_rate(r.get('transfer'))} | "
            f"{flip_text} | {_flagged(flips, 'variant')} | {_flagged(flips, 'original')} |"
        )
    return lines + [""]


def _flagged(flips: dict, on: str) -> str:
    flagged = flips.get(f"flagged_on_{on}")
    if not flagged:
        return "-"
    base = flips.get(f"answered_on_{on}_all")
    return f"{flagged['k']}/{flagged['n']}" + (f" (all: {100 * base['value']:.0f}%)" if base else "")

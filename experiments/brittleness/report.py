"""The brittleness report's figure (ASR, over-refusal and utility against the fraction removed,
with 95% intervals) and markdown table."""

from __future__ import annotations

from refusal.error_bars import error_bars
from refusal.judge_report import judges_markdown
from refusal.stats import fmt_p, fmt_rate, fmt_value_ci

SETTING_LABELS = {"vanilla": "vanilla", "adv_decoding": "adv-decoding", "adv_suffix": "adv-suffix"}
METHOD_COLOURS = {
    "top-wanda": "#1f77b4",
    "top-snip": "#ff7f0e",
    "setdiff-wanda": "#2ca02c",
    "setdiff-snip": "#d62728",
    "random": "#7f7f7f",
    "actsvd": "#9467bd",
    "actsvd-orth": "#8c564b",
}


def curves(report: dict) -> dict[tuple[str, str], list[dict]]:
    """(family, method) -> its points sorted by x, each curve starting at the original (x = 0)."""
    rows = report["points"]
    original = next(r for r in rows if r["method"] == "original")
    out: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        if r["method"] != "original":
            out.setdefault((r["family"], r["method"]), [original]).append(r)
    return {k: sorted(v, key=lambda r: r["x"]) for k, v in out.items()}


def brittleness_figure(report: dict):
    """ASR (three settings, both judges), mean zero-shot accuracy and perplexity vs the amount removed.

    Top row: weight methods against the fraction of weights removed; bottom row: ActSVD against the
    fraction of ranks removed. Wei judge solid, Arditi judge dotted; collapsed points are crosses.
    """
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    settings = report["settings"]
    titles = [f"{SETTING_LABELS[s]} ASR" for s in settings] + ["mean zero-shot accuracy", "wikitext-2 perplexity"]
    cols = len(titles)
    by_curve = curves(report)
    families = [f for f in ("weights", "ranks") if any(k[0] == f for k in by_curve)] or ["weights"]
    fig = make_subplots(
        rows=len(families),
        cols=cols,
        subplot_titles=[t for _ in families for t in titles],
        horizontal_spacing=0.06,
        vertical_spacing=0.16 if len(families) > 1 else 0.1,
    )
    shown = set()
    for (family, method), pts in by_curve.items():
        row = families.index(family) + 1
        x = [100 * p["x"] for p in pts]
        symbols = ["x" if p["collapse"]["collapsed"] else "circle" for p in pts]
        hover = [
            f"{p['spec']}<br>removed {100 * p['x']:.2f}%<br>perplexity {p['perplexity']:.1f}"
            f"<br>zero-shot {100 * p['zero_shot']['mean']:.1f}%"
            + ("<br>COLLAPSED: " + p["collapse"]["reason"] if p["collapse"]["collapsed"] else "")
            for p in pts
        ]
        style = dict(
            name=method,
            legendgroup=method,
            text=hover,
            hovertemplate="%{text}<br>y %{y:.1f}<extra>" + method + "</extra>",
            marker=dict(
                symbol=symbols, size=[11 if s == "x" else 7 for s in symbols], color=METHOD_COLOURS.get(method, "black")
            ),
        )
        colour = style["marker"]["color"]
        panels = [
            (
                col,
                [100 * p["asr"][setting][judge] for p in pts],
                dash,
                [((p.get("rates") or {}).get("asr", {}).get(setting) or {}).get(judge) for p in pts],
            )
            for col, setting in enumerate(settings, start=1)
            for judge, dash in (("wei2024", "solid"), ("arditi2024", "dot"))
        ]
        panels += [
            (cols - 1, [100 * p["zero_shot"]["mean"] for p in pts], "solid", [p["zero_shot"].get("rate") for p in pts]),
            (cols, [p["perplexity"] for p in pts], "solid", None),
        ]
        for col, y, dash, rates in panels:
            if rates is None:  # perplexity: its own units
                cis = [p.get("perplexity_ci") for p in pts]
                err = dict(
                    type="data",
                    symmetric=False,
                    visible=any(cis),
                    array=[c["ci95"][1] - c["value"] if c else 0 for c in cis],
                    arrayminus=[c["value"] - c["ci95"][0] if c else 0 for c in cis],
                )
            else:
                err = error_bars(rates)
            fig.add_trace(
                go.Scatter(
                    x=x,
                    y=y,
                    mode="lines+markers",
                    showlegend=method not in shown,
                    error_y=dict(err, thickness=1),
                    line=dict(color=colour, dash=dash, width=2),
                    **style,
                ),
                row=row,
                col=col,
            )
            shown.add(method)
    # Legend keys for the line styles and the collapse marker.
    for name, line, marker in (
        ("Wei et al. judge", dict(color="black", dash="solid"), dict(symbol="circle", color="black")),
        ("Arditi et al. judge", dict(color="black", dash="dot"), dict(symbol="circle", color="black")),
        ("collapsed (x)", dict(color="rgba(0,0,0,0)"), dict(symbol="x", size=11, color="black")),
    ):
        fig.add_trace(
            go.Scatter(x=[None], y=[None], mode="lines+markers", name=name, line=line, marker=marker), row=1, col=1
        )
    for row, family in enumerate(families, start=1):
        xlabel = "weights removed (%)" if family == "weights" else "ranks removed (%)"
        for col in range(1, cols + 1):
            fig.update_xaxes(title_text=xlabel, row=row, col=col)
        for col in range(1, len(settings) + 1):
            fig.update_yaxes(title_text="ASR (%)" if col == 1 else None, range=[-3, 103], row=row, col=col)
        fig.update_yaxes(title_text="accuracy (%)", row=row, col=cols - 1)
        fig.update_yaxes(title_text="perplexity (log)", type="log", row=row, col=cols)
    fig.update_layout(
        # Two lines: a model name as long as the embedded one's does not fit one line at this width.
        title=f"Brittleness of safety: {report.get('model_name', report['model'])}<br>"
        f"<sup>{_n_prompts(report)} held-out harmful prompts per ASR point, 95% intervals"
        + ("; top row: weights removed, bottom row: ranks removed" if len(families) == 2 else "")
        + "</sup>",
        width=1250,
        height=370 * len(families) + 190,
        font=dict(size=14),
        # Below the x-axis titles whatever the number of rows: anchored to the bottom of the page
        # (a plot-relative y put it on the titles of a one-row figure).
        legend=dict(orientation="h", yanchor="bottom", y=0, yref="container", xanchor="center", x=0.5),
        margin=dict(l=60, r=20, t=110, b=150),
    )
    return fig


def _n_prompts(report: dict) -> str:
    ev = report.get("evaluation")
    return str(ev["harmful"]["n"]) if ev else str(report["n_asr"])


def render_markdown(report: dict) -> str:
    settings = report["settings"]
    head = (
        ["method", "spec", "removed (%)"]
        + [f"{SETTING_LABELS[s]} ASR Arditi | p" for s in settings]
        + ["vanilla ASR Wei", "over-refusal (Arditi) | p", "perplexity", "zero-shot mean", "collapsed"]
    )
    ev = report.get("evaluation") or {}
    what = (
        f"ASR on {ev['harmful']['n']} held-out harmful prompts ({', '.join(f'{k} {n}' for k, n in ev['harmful']['per_source'].items())}; "
        f"overlap with any prompt a stage fits on: {ev['harmful']['overlap_with_fitted']}), over-refusal on {ev['harmless']['n']} held-out "
        f"harmless prompts"
        if ev
        else f"ASR on the first {report['n_asr']} AdvBench goals"
    )
    lines = [
        f"# Brittleness sweep: {report.get('model_name', report['model'])}",
        "",
        (
            f"{what}; zero-shot tasks {', '.join(report['config']['zero_shot_tasks'])} "
            f"(limit {report['config']['zero_shot_limit'] or 'all'}); run time {report['wall_seconds']:.0f} s. "
            "95% intervals (Wilson; adv-decoding: bootstrap over prompts; adv-suffix: best suffix; perplexity and zero-shot: "
            "bootstrap). p: exact McNemar test against the original on the same prompts, Holm over the points per column; "
            "* = significant at 5% (adv-decoding's 5 samples per prompt have no McNemar test)."
        ),
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * (len(head) + len(settings) + 1),
    ]
    for p in report["points"]:
        r, t = p.get("rates") or {}, p.get("tests") or {}
        asr = []
        for s in settings:
            rate = r.get("asr", {}).get(s, {}).get("arditi2024")
            asr += [
                fmt_rate(rate) if rate else f"{100 * p['asr'][s]['arditi2024']:.0f}%",
                fmt_p((t.get("asr", {}).get(s) or {}).get("arditi2024")) if t else "",
            ]
        unit = "ranks" if p["family"] == "ranks" else "weights"
        wei = r.get("asr", {}).get("vanilla", {}).get("wei2024")
        zs = p["zero_shot"].get("rate")
        cells = [
            p["method"],
            f"`{p['spec']}`",
            f"{100 * p['x']:.2f} {unit}" if p["method"] != "original" else "0",
            *asr,
            fmt_rate(wei) if wei else f"{100 * p['asr']['vanilla']['wei2024']:.0f}%",
            fmt_rate(r.get("over_refusal", {}).get("arditi2024")),
            fmt_p((t.get("over_refusal") or {}).get("arditi2024")) if t else "",
            fmt_value_ci(p["perplexity_ci"], ".1f") if p.get("perplexity_ci") else f"{p['perplexity']:.1f}",
            fmt_rate(zs) if zs else f"{100 * p['zero_shot']['mean']:.1f}%",
            ("yes: " + p["collapse"]["reason"]) if p["collapse"]["collapsed"] else "no",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if report.get("judges"):
        lines += judges_markdown(report["judges"])
    return "\n".join(lines) + "\n"


# --- CLI -------------------------------------------------------------------------------------

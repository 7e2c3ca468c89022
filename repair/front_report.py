"""The cost-benefit front in repair.md and as a figure: restored weights against refusal on the
validation prompts, for the anchored search, the static baseline, AIRD (and targeted restoration
when it ran), with the original's interval and the chosen point marked."""

from __future__ import annotations

from refusal.error_bars import error_bars
from refusal.stats import fmt_rate

from .report import small_pct

METHOD_TEXT = {
    "compressed": "compressed",
    "step": "anchored step",
    "rollback": "anchored, after rollback",
    "bisect": "anchored, bisection",
    "static": "static ranking",
    "aird": "AIRD",
    "targeted": "targeted",
}


def front_points(front: dict) -> list[dict]:
    """Every point of the front, anchored first (in search order), then the baselines by cost."""
    a = front["anchored"]
    points = [dict(p, method="anchored", chosen=i == a["chosen"]) for i, p in enumerate(a["points"])]
    others = [dict(p, method="static") for p in front["static"]] + [dict(front["aird"], method="aird")]
    if front.get("targeted"):
        others.append(dict(front["targeted"], method="targeted"))
    return points + sorted(others, key=lambda p: p["restored"])


def front_section(r: dict) -> list[str]:
    front = r.get("front")
    if not front:
        return []
    a, o = front["anchored"], front["original"]
    chosen = a["points"][a["chosen"]]
    n_h, n_s = o["refusal_harmful"]["n"], o["refusal_harmless"]["n"]
    verdict = (
        f"It reached the original with {chosen['restored']:,} weights ({small_pct(chosen['fraction_of_changed'])} of the "
        f"{a['changed']:,} the compression changed)"
        if a["reached"]
        else f"It did not reach the original ({a['reason']}); the best point kept restores {chosen['restored']:,} weights "
        f"({small_pct(chosen['fraction_of_changed'])} of the {a['changed']:,} changed)"
    )
    # Results written before the aim existed stopped at the interval's lower end.
    bar = (
        "original's point estimate"
        if a.get("aim", "interval") == "point"
        else "lower end of the original's 95% interval"
    )
    lines = [
        "",
        "## Anchored restoration: the cost-benefit front",
        "",
        f"Validation prompts (never fitted, never in the held-out evaluation): {n_h} harmful, {n_s} harmless; refusal judged by "
        "Arditi et al.'s strings on greedy replies; KL of the next-token distribution on the harmless prompts. The search restores "
        f"{a['step_weights']:,} weights per step, re-scored each step, and stops at the first state whose harmful refusal reaches the "
        f"{bar} ({fmt_rate(o['refusal_harmful'])}) with harmless refusal not above the original's 95% interval "
        f"({fmt_rate(o['refusal_harmless'])}). {verdict}.",
        "",
        "| method | step | weights restored | of changed | bytes | refusal, harmful | refusal, harmless | KL to original | KL to compressed | anchor loss |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in front_points(front):
        mark = " (chosen)" if p.get("chosen") else " (undone)" if p.get("undone") else ""
        loss = (p.get("loss") or {}).get("total")
        stored = "-" if p.get("bytes") is None else f"{p['bytes']:,}"
        lines.append(
            f"| {METHOD_TEXT.get(p['kind'], p['kind'])}{mark} | {p.get('step', '-')} | {p['restored']:,} | "
            f"{small_pct(p['fraction_of_changed']) if p['restored'] else '0%'} | {stored} | "
            f"{fmt_rate(p['refusal_harmful'])} | {fmt_rate(p['refusal_harmless'])} | {p['kl_original']:.3f} | {p['kl_compressed']:.3f} | "
            f"{'-' if loss is None else f'{loss:.3f}'} |"
        )
    return lines


def front_figure(r: dict, title: str | None = None):
    """Validation refusal (harmful, top; harmless and KL to the original, bottom) against restored weights."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    front = r["front"]
    o = front["original"]
    fig = make_subplots(
        rows=2,
        cols=1,
        shared_xaxes=True,
        vertical_spacing=0.08,
        row_heights=[0.6, 0.4],
        specs=[[{}], [{"secondary_y": True}]],
    )
    styles = {
        "anchored": ("#d62728", "circle"),
        "static": ("#1f77b4", "square"),
        "aird": ("#2ca02c", "diamond"),
        "targeted": ("#9467bd", "cross"),
    }
    pts = front_points(front)
    x_of = lambda p: max(1, p["restored"])  # log axis: the compressed model (0 restored) sits at 1
    for method, (color, symbol) in styles.items():
        mine = [p for p in pts if p["method"] == method and not p.get("undone")]
        if method == "static":
            mine = [p for p in pts if p["method"] == "anchored" and p["restored"] == 0] + mine
        if not mine:
            continue
        mine = sorted(mine, key=lambda p: p["restored"]) if method != "anchored" else mine
        mode = "markers" if method in ("aird", "targeted") else "lines+markers"
        name = {
            "anchored": "anchored restoration",
            "static": "static ranking (baseline)",
            "aird": "AIRD",
            "targeted": "targeted (one-shot)",
        }[method]
        fig.add_trace(
            go.Scatter(
                x=[x_of(p) for p in mine],
                y=[100 * p["refusal_harmful"]["value"] for p in mine],
                mode=mode,
                name=name,
                line_color=color,
                marker_symbol=symbol,
                marker_size=9,
                error_y=error_bars([p["refusal_harmful"] for p in mine]),
            ),
            row=1,
            col=1,
        )
        fig.add_trace(
            go.Scatter(
                x=[x_of(p) for p in mine],
                y=[100 * p["refusal_harmless"]["value"] for p in mine],
                mode=mode,
                showlegend=False,
                line_color=color,
                marker_symbol=symbol,
                marker_size=7,
                name=f"{name}: over-refusal",
            ),
            row=2,
            col=1,
        )
        fig.add_trace(
            go.Scatter(
                x=[x_of(p) for p in mine],
                y=[p["kl_original"] for p in mine],
                mode=mode,
                showlegend=False,
                opacity=0.5,
                line_dash="dot",
                line_color=color,
                marker_symbol=symbol,
                name=f"{name}: KL to original",
            ),
            row=2,
            col=1,
            secondary_y=True,
        )
    chosen = next(p for p in pts if p.get("chosen"))
    fig.add_trace(
        go.Scatter(
            x=[x_of(chosen)],
            y=[100 * chosen["refusal_harmful"]["value"]],
            mode="markers",
            name="chosen repair",
            marker_symbol="star",
            marker_size=18,
            marker_color="#d62728",
            marker_line_color="black",
            marker_line_width=1,
        ),
        row=1,
        col=1,
    )
    for row, key, label in ((1, "refusal_harmful", "original's 95% interval"), (2, "refusal_harmless", None)):
        lo, hi = o[key]["ci95"]
        fig.add_hrect(
            y0=100 * lo,
            y1=100 * hi,
            fillcolor="#888",
            opacity=0.15,
            line_width=0,
            row=row,
            col=1,
            annotation_text=label,
            annotation_position="top left",
        )
    if front["anchored"].get("aim", "interval") == "point":
        # The stop rule's bar: the search stops at the first state at or above it.
        fig.add_hline(
            y=100 * o["refusal_harmful"]["value"],
            line_dash="dash",
            line_color="#555",
            row=1,
            col=1,
            annotation_text="original (the stop rule's aim)",
            annotation_position="bottom right",
        )
    fig.update_xaxes(type="log", title_text="weights restored (log scale; 1 = nothing restored)", row=2, col=1)
    fig.update_yaxes(title_text="refusal, harmful val (%)", range=[0, 102], row=1, col=1)
    fig.update_yaxes(title_text="refusal, harmless val (%)", range=[0, 102], row=2, col=1)
    fig.update_yaxes(title_text="KL to original (dotted)", row=2, col=1, secondary_y=True, rangemode="tozero")
    fig.update_layout(
        title=(title or f"Repair front: {r['compressed']}")
        + "<br><sup>validation prompts, 95% Wilson intervals; band: the original</sup>",
        height=700,
        width=950,
        legend=dict(orientation="h", yanchor="top", y=-0.12, x=0),
    )
    return fig

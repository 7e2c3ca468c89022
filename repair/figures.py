"""The repair figures, drawn from the JSON-able result of `repair.pipeline.Repair.run`: every state's
ASR before and after (with the weights each repair restored), and ASR against restored weights."""

from __future__ import annotations

from refusal.error_bars import error_bars

from .report import JUDGES, LABELS, curve_points, small_pct

# Curve points whose harmless next-token distribution moved this far are marked broken.
BROKEN_KL = 1.0


def before_after_figure(r: dict, title: str | None = None):
    """ASR of every state under both judges, with the weights each repair restored (its density cost)."""
    import plotly.graph_objects as go

    states = r["states"]
    names = [LABELS[s] for s in states]
    fig = go.Figure()
    for judge, name in JUDGES:
        fig.add_trace(
            go.Bar(
                x=names,
                y=[100 * s["asr"]["vanilla"][judge] for s in states.values()],
                name=f"vanilla ASR, {name} judge",
                error_y=error_bars([rate_of(s, "asr", "vanilla", judge) for s in states.values()]),
            )
        )
        if all("adv_suffix" in s["asr"] for s in states.values()):
            fig.add_trace(
                go.Bar(
                    x=names,
                    y=[100 * s["asr"]["adv_suffix"][judge] for s in states.values()],
                    name=f"adv-suffix ASR, {name} judge",
                    error_y=error_bars([rate_of(s, "asr", "adv_suffix", judge) for s in states.values()]),
                )
            )
    hollow = (r.get("hollow") or {}).get("states") or {}
    if all(name in hollow for name in states):
        # The keyword judges count "I'm sorry, I'll ..." as a refusal; this bar counts clean refusals only.
        strict = [hollow[name]["strict_asr"] for name in states]
        fig.add_trace(
            go.Bar(
                x=names,
                y=[100 * x["value"] for x in strict],
                name="strict ASR (clean refusals only, refusal.hollow)",
                marker_color="#8c564b",
                error_y=error_bars(strict),
            )
        )
    if all(s.get("rates") for s in states.values()):
        fig.add_trace(
            go.Bar(
                x=names,
                y=[100 * s["rates"]["over_refusal"]["arditi2024"]["value"] for s in states.values()],
                name="over-refusal on harmless, Arditi judge",
                marker_color="#999",
                error_y=error_bars([s["rates"]["over_refusal"]["arditi2024"] for s in states.values()]),
            )
        )
    fig.add_trace(
        go.Scatter(
            x=names,
            y=[110] * len(names),
            mode="text",
            text=[density_label(s) for s in states.values()],
            showlegend=False,
            textfont_size=12,
        )
    )
    fig.update_layout(
        title=(title or f"Repair before/after: {r['compressed']}") + "<br><sup>95% intervals</sup>",
        barmode="group",
        xaxis_title="model state",
        yaxis_title="attack success rate (%)",
        yaxis_range=[0, 124],
        yaxis_tickvals=list(range(0, 101, 20)),
        height=450,
        width=900,
    )
    return fig


def rate_of(state: dict, measure: str, setting: str, judge: str) -> dict | None:
    return (((state.get("rates") or {}).get(measure) or {}).get(setting) or {}).get(judge)


def density_label(state: dict) -> str:
    """The density cost over a bar: restored weights as a count and a share, then the decoder's sparsity.

    Counts, since targeted restoration's few thousand weights print as 0.00% of the model.
    """
    sparsity = (state.get("sparsity") or {}).get("decoder_linear_sparsity")
    lines = []
    if state.get("restored"):
        # Two lines: on one, neighbouring states' labels run into each other.
        lines += [
            f"{state['restored']:,} restored",
            f"({small_pct(state['restored_fraction_of_model'], digits=2)} of the model)",
        ]
    if sparsity is not None:
        lines.append(f"decoder sparsity {100 * sparsity:.2f}%")
    return "<br>".join(lines)


def curve_figure(results: dict[str, dict], title: str = "ASR against restored weights: AIRD vs targeted"):
    """Vanilla ASR (Arditi judge) against restored weights for each checkpoint and method; log x."""
    import plotly.graph_objects as go

    fig = go.Figure()
    # Ten distinct hues: the default comparison repairs eight checkpoints, and a repeated colour
    # would make two of them read as one.
    palette = (
        "#1f77b4",
        "#d62728",
        "#2ca02c",
        "#9467bd",
        "#ff7f0e",
        "#8c564b",
        "#e377c2",
        "#7f7f7f",
        "#bcbd22",
        "#17becf",
    )
    for i, (label, r) in enumerate(results.items()):
        for method, points in curve_points(r).items():
            pts = [p for p in points if p["k"] > 0]
            base = points[0]["asr"]["arditi2024"]
            symbol = "circle" if method == "AIRD" else "diamond"
            broken = [p.get("kl") is not None and p["kl"] > BROKEN_KL for p in pts]
            fig.add_trace(
                go.Scatter(
                    x=[1] + [p["k"] for p in pts],
                    y=[100 * base] + [100 * p["asr"]["arditi2024"] for p in pts],
                    error_y=error_bars([(p.get("rates") or {}).get("arditi2024") for p in [points[0], *pts]]),
                    mode="lines+markers",
                    name=f"{label}: {method}",
                    line_color=palette[i % len(palette)],
                    line_dash="solid" if method == "AIRD" else "dot",
                    marker_symbol=[symbol] + ["x" if b else symbol for b in broken],
                    marker_size=[8] + [14 if b else 8 for b in broken],
                    customdata=[0.0] + [p.get("kl") for p in pts],
                    hovertemplate="%{x:,} weights<br>ASR %{y:.1f}%<br>KL on harmless %{customdata:.3f}<extra>"
                    + f"{label}: {method}</extra>",
                )
            )
    title += f"<br><sup>x: KL on harmless prompts > {BROKEN_KL:g}, the model is broken there (its ASR counts garbled text)</sup>"
    fig.update_layout(
        title=title,
        xaxis_type="log",
        xaxis_title="weights restored (log scale; 1 = nothing restored)",
        yaxis_title="vanilla ASR, Arditi judge (%)",
        yaxis_range=[0, 102],
        height=600,
        width=900,
        legend_title="checkpoint: method",
        legend=dict(orientation="h", yanchor="top", y=-0.2, x=0),
    )
    return fig

"""The frozen fine-tuning study's report: markdown summary, overlap/Jaccard bars and drift curves.

Everything renders the JSON-able report dict that experiments.frozen_finetune writes, so the
report can be re-rendered from report.json without a model.
"""

from __future__ import annotations

LABELS = {
    "safety_critical": "safety-critical",
    "top_safety": "top safety",
    "top_utility": "top utility",
    "random": "random",
}
COLORS = {"safety_critical": "#d62728", "top_safety": "#ff7f0e", "top_utility": "#1f77b4", "random": "#7f7f7f"}
ARM_LABELS = {"frozen": "safety-critical frozen", "unfrozen": "nothing frozen"}


def overlap_figure(report: dict):
    """Jaccard (left) and overlap (right) of each recomputed group with the original, per arm."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    groups = list(report["published_jaccard"])
    x = [LABELS[g] for g in groups]
    fig = make_subplots(
        rows=1,
        cols=2,
        horizontal_spacing=0.1,
        subplot_titles=("Jaccard index |A∩B| / |A∪B|", "Overlap |A∩B| / |A| (share of the original set kept)"),
    )
    shades = {"frozen": "#2ca02c", "unfrozen": "#9467bd"}
    for arm, res in report["arms"].items():
        fig.add_trace(
            go.Bar(
                x=x,
                y=[res["agreement"][g]["jaccard"] for g in groups],
                name=f"this run, {ARM_LABELS[arm]}",
                marker_color=shades[arm],
                legendgroup=arm,
                texttemplate="%{y:.2f}",
                textposition="outside",
            ),
            row=1,
            col=1,
        )
        fig.add_trace(
            go.Bar(
                x=x,
                y=[100 * res["agreement"][g]["overlap"] for g in groups],
                name=f"this run, {ARM_LABELS[arm]}",
                marker_color=shades[arm],
                legendgroup=arm,
                showlegend=False,
                texttemplate="%{y:.0f}%",
                textposition="outside",
            ),
            row=1,
            col=2,
        )
    fig.add_trace(
        go.Bar(
            x=x,
            y=[report["published_jaccard"][g] for g in groups],
            name="CS2881 (published, frozen)",
            marker_color="#bbbbbb",
            texttemplate="%{y:.2f}",
            textposition="outside",
        ),
        row=1,
        col=1,
    )
    fig.add_trace(
        go.Scatter(
            x=x,
            y=[report["chance_jaccard"][g] for g in groups],
            mode="markers",
            name="chance (random sets of the same size)",
            marker=dict(symbol="line-ew-open", size=28, color="black", line=dict(width=3, color="black")),
        ),
        row=1,
        col=1,
    )
    fig.update_yaxes(title_text="Jaccard index (0-1)", range=[0, 1.08], row=1, col=1)
    fig.update_yaxes(title_text="overlap (% of original set)", range=[0, 108], row=1, col=2)
    fig.update_xaxes(title_text="weight group (recomputed after fine-tuning)", row=1, col=1)
    fig.update_xaxes(title_text="weight group (recomputed after fine-tuning)", row=1, col=2)
    cfg = report["config"]
    fig.update_layout(
        title=f"Weight groups before vs after LoRA fine-tuning ({cfg['steps']} steps, p = q = {cfg['q']:g})"
        if cfg["p"] == cfg["q"]
        else f"Weight groups before vs after LoRA fine-tuning ({cfg['steps']} steps, p = {cfg['p']:g}, q = {cfg['q']:g})",
        barmode="group",
        height=480,
        width=1100,
        legend=dict(orientation="h", yanchor="top", y=-0.2, x=0),
        margin=dict(b=120),
    )
    return fig


def drift_figure(report: dict):
    """Mean |dW|, guarded relative drift and norm ratio of the four groups at each checkpoint."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    eps = report["config"]["eps_fraction"]
    panels = (
        ("mean_abs", 1.0, "mean |ΔW| (weight units)"),
        ("mean_relative", 100.0, "mean |ΔW| / max(|W0|, eps) (%)"),
        ("norm_ratio", 100.0, "‖ΔW‖ / ‖W0‖ over the group (%)"),
    )
    fig = make_subplots(
        rows=1,
        cols=3,
        horizontal_spacing=0.08,
        subplot_titles=("absolute drift", f"relative drift (eps = {eps:g} × mean |W0|)", "norm ratio"),
    )
    for arm, dash in (("unfrozen", "solid"), ("frozen", "dot")):
        drift = report["arms"][arm]["drift"]
        steps = [d["step"] for d in drift]
        for group, label in LABELS.items():
            for col, (key, scale, _) in enumerate(panels, start=1):
                fig.add_trace(
                    go.Scatter(
                        x=steps,
                        y=[scale * d["groups"][group][key] for d in drift],
                        mode="lines+markers",
                        line=dict(color=COLORS[group], dash=dash),
                        marker=dict(size=6),
                        name=f"{label}, {ARM_LABELS[arm]}",
                        legendgroup=f"{arm}-{group}",
                        showlegend=col == 1,
                    ),
                    row=1,
                    col=col,
                )
    for col, (_, _, title) in enumerate(panels, start=1):
        fig.update_yaxes(title_text=title, rangemode="tozero", exponentformat="e", row=1, col=col)
        fig.update_xaxes(title_text="training step", row=1, col=col)
    fig.update_layout(
        title="Drift of the weight groups during LoRA fine-tuning (float32, merged weights; dotted: safety-critical frozen)",
        height=520,
        width=1200,
        legend=dict(orientation="h", yanchor="top", y=-0.18, x=0),
        margin=dict(b=150),
    )
    return fig


def render_markdown(report: dict) -> str:
    cfg = report["config"]
    sizes = report["group_sizes"]
    lines = [
        f"# Frozen fine-tuning: {report['model_name']}",
        "",
        (
            f"Wall time {report['wall_seconds']:.0f} s. LoRA rank {cfg['rank']} (alpha {cfg['alpha']:g}) on {', '.join(cfg['targets'])}; "
            f"{cfg['steps']} AdamW steps of {cfg['batch_size']} sequences at lr {cfg['lr']:g} on {report['n_pairs']['train']} harmless "
            f"instructions with the model's own greedy replies. Wanda scores on {report['n_pairs']['safety']} own refusals (safety) "
            f"and {report['n_pairs']['utility']} own harmless replies (utility); p = {cfg['p']:g}, q = {cfg['q']:g}, ranked per {cfg['per']}."
        ),
        "",
        "## Groups",
        "",
        "| group | weights | share of decoder linear weights |",
        "|---|---:|---:|",
    ]
    lines += [f"| {LABELS[g]} | {s['selected']:,} | {100 * s['fraction']:.2f}% |" for g, s in sizes.items()]
    lines += [
        "",
        "## Recomputed groups vs the originals",
        "",
        (
            "Overlap = |A∩B| / |A| (share of the original set still selected); Jaccard = |A∩B| / |A∪B|. "
            "Chance: the Jaccard of two independent random sets of the same share."
        ),
        "",
        "| group | Jaccard, frozen | Jaccard, unfrozen | CS2881 (frozen) | chance | overlap, frozen | overlap, unfrozen |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    arms = report["arms"]
    for g, published in report["published_jaccard"].items():
        f, u = arms["frozen"]["agreement"][g], arms["unfrozen"]["agreement"][g]
        lines.append(
            f"| {LABELS[g]} | {f['jaccard']:.3f} | {u['jaccard']:.3f} | {published:.2f} | {report['chance_jaccard'][g]:.3f} | "
            f"{100 * f['overlap']:.1f}% | {100 * u['overlap']:.1f}% |"
        )
    check = arms["frozen"]["frozen_unchanged"]
    lines += [
        "",
        f"Freezing check: {check['moved']} of {check['frozen']:,} frozen weights changed, over {check['matrices_checked']} targeted matrices.",
        "",
        "## Drift after the last step (float32, merged weights)",
        "",
        (
            f"Relative drift divides by max(|W0|, eps) with eps = {cfg['eps_fraction']:g} × mean |W0| of the matrix; "
            "'guarded' is the share of a group's weights where eps applied."
        ),
        "",
        "| arm | group | mean abs drift | mean relative drift | norm ratio | max abs drift | guarded |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for arm, res in arms.items():
        for g, d in res["final_drift"].items():
            lines.append(
                f"| {ARM_LABELS[arm]} | {LABELS[g]} | {d['mean_abs']:.3g} | {100 * d['mean_relative']:.2f}% | "
                f"{100 * d['norm_ratio']:.2f}% | {d['max_abs']:.3g} | {100 * d['guarded']:.1f}% |"
            )
    lines += ["", "## Training", ""]
    for arm, res in arms.items():
        losses = res["losses"]
        lines.append(
            f"- {ARM_LABELS[arm]}: loss {losses[0]:.3f} at the first step, {losses[-1]:.3f} at the last; "
            f"{res['train_seconds']:.0f} s of training."
        )
    return "\n".join(lines) + "\n"

"""Comparing refusal directions across compressed variants of one base model.

Pure functions on the artifacts selection and extraction leave behind: the cosine map of a
variant's candidates against the original's chosen direction, the shift of the chosen source,
and plotly figures of both plus the quality scores.
"""

from __future__ import annotations

import torch

from lm.errors import UserError


def cosine_to_direction(candidates: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """[n_pos, n_layers, d] candidates vs one [d] direction -> [n_pos, n_layers] cosines (0 for zero vectors)."""
    if candidates.shape[-1] != direction.shape[-1]:
        raise UserError(f"direction width {direction.shape[-1]} does not match candidates {candidates.shape[-1]}")
    c = candidates.double()
    r = direction.double() / direction.double().norm()
    norms = c.norm(dim=-1)
    cos = (c @ r) / norms.clamp(min=1e-30)
    return torch.where(norms > 0, cos, torch.zeros_like(cos)).float()


def source_shift(original: tuple[int, int] | None, variant: tuple[int, int] | None) -> dict:
    """How the chosen (position, layer) moved; None entries when a side chose nothing."""
    if original is None or variant is None:
        return dict(same=False, d_layer=None, d_position=None)
    return dict(
        same=tuple(original) == tuple(variant), d_layer=variant[1] - original[1], d_position=variant[0] - original[0]
    )


def cosine_heatmaps_figure(
    maps: dict[str, torch.Tensor],
    positions: list[int],
    chosen: tuple[int, int] | None,
    title: str,
    value: str = "cosine",
    zrange: tuple[float, float] = (-1, 1),
    colorscale: str = "RdBu",
    reverse: bool = True,
):
    """One heatmap per variant (x = layer, y = post-instruction position), shared colour scale
    (`zrange`; cosines by default, any per-candidate value with `value` naming it).

    Two columns from four variants on: a position x layer map is wide and flat, and one column of
    ten of them is too tall to read beside a README's text.
    """
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    names = list(maps)
    cols = 2 if len(names) >= 4 else 1
    rows = -(-len(names) // cols)
    # Room between rows for each subplot's x-axis title and the next one's name.
    fig = make_subplots(
        rows=rows,
        cols=cols,
        subplot_titles=names,
        horizontal_spacing=0.08,
        vertical_spacing=min(0.3, 0.35 / max(1, rows - 1)) if rows > 1 else 0.1,
    )
    for i, name in enumerate(names):
        row, col = i // cols + 1, i % cols + 1
        cos = maps[name]
        fig.add_trace(
            go.Heatmap(
                z=cos.tolist(),
                x=list(range(cos.shape[1])),
                y=[str(p) for p in positions],
                zmin=zrange[0],
                zmax=zrange[1],
                colorscale=colorscale,
                reversescale=reverse,
                colorbar=dict(title=value, len=0.9),
                showscale=i == 0,
                hovertemplate="layer %{x}<br>position %{y}<br>" + value + " %{z:.3f}<extra></extra>",
            ),
            row=row,
            col=col,
        )
        if chosen is not None:
            fig.add_trace(
                go.Scatter(
                    x=[chosen[1]],
                    y=[str(chosen[0])],
                    mode="markers",
                    marker=dict(symbol="x", size=12, color="black"),
                    name="original's source",
                    showlegend=i == 0,
                ),
                row=row,
                col=col,
            )
        fig.update_xaxes(title_text="layer", row=row, col=col)
        fig.update_yaxes(title_text="position", row=row, col=col)
    fig.update_layout(
        title=title,
        height=280 * rows + 140,
        width=900 if cols == 1 else 1300,
        legend=dict(orientation="h", yanchor="bottom", y=1.0 + 40 / (280 * rows + 140), x=1, xanchor="right"),
    )
    return fig


def source_shift_figure(
    sources: dict[str, tuple[int, int] | None], n_layers: int, title: str, reference: str | None = None
):
    """Chosen source layer (marker) and position (label) of each selected variant.

    None marks a variant whose selection ran and found no candidate passing the filters: it is
    listed, not dropped, since "refusal has no source left" is the most drastic shift of all.
    """
    import plotly.graph_objects as go

    names = list(sources)
    chosen = [n for n in names if sources[n] is not None]
    fig = go.Figure(
        go.Scatter(
            x=[sources[n][1] for n in chosen],
            y=chosen,
            mode="markers+text",
            text=[f"pos {sources[n][0]}" for n in chosen],
            textposition="middle right",
            marker=dict(size=14),
            name="chosen source",
            hovertemplate="%{y}<br>layer %{x}, %{text}<extra></extra>",
        )
    )
    for n in names:
        if sources[n] is None:
            fig.add_annotation(
                x=0,
                y=n,
                xanchor="left",
                showarrow=False,
                text="no candidate passes the selection filters",
                font=dict(color="#7f7f7f"),
            )
    if reference is not None and sources.get(reference) is not None:
        fig.add_vline(
            x=sources[reference][1],
            line_dash="dot",
            line_color="#7f7f7f",
            annotation_text=f"{reference}'s layer",
            annotation_position="top",
        )
    fig.update_layout(
        title=title,
        xaxis=dict(title="source layer (of %d)" % n_layers, range=[-0.5, n_layers - 0.5], dtick=2),
        yaxis=dict(title="variant", categoryorder="array", categoryarray=names[::-1]),
        height=160 + 50 * len(names),
        width=900,
        showlegend=False,
    )
    return fig


def quality_bars_figure(rows: list[dict], title: str):
    """Bypass / induce / KL of each variant's own direction and of the original's direction in it."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    metrics = (
        ("bypass", "bypass score<br>(lower = ablation removes refusal)"),
        ("induce", "induce score<br>(higher = addition causes refusal)"),
        ("kl", "KL on harmless<br>(lower = less side effect)"),
    )
    fig = make_subplots(rows=1, cols=3, subplot_titles=[m[1] for m in metrics])
    names = [r.get("label") or r["variant"] for r in rows]
    for col, (key, _) in enumerate(metrics, start=1):
        for which, colour in (("own", "#1f77b4"), ("original_direction", "#ff7f0e")):
            values = [(r.get(which) or {}).get(key) for r in rows]
            # 95% bootstrap intervals over the validation prompts, where the result kept them.
            cis = [((r.get(which) or {}).get("ci95") or {}).get(key) for r in rows]
            error = dict(
                type="data",
                symmetric=False,
                array=[c["ci95"][1] - v if c and v is not None else None for c, v in zip(cis, values)],
                arrayminus=[v - c["ci95"][0] if c and v is not None else None for c, v in zip(cis, values)],
            )
            fig.add_trace(
                go.Bar(
                    x=names,
                    y=values,
                    name="own direction" if which == "own" else "original's direction",
                    marker_color=colour,
                    showlegend=col == 1,
                    error_y=error,
                ),
                row=1,
                col=col,
            )
        fig.update_yaxes(title_text="refusal log-odds" if key != "kl" else "nats", row=1, col=col)
    fig.update_layout(
        title=f"{title}<br><sup>means over the shared validation prompts, 95% bootstrap intervals</sup>",
        barmode="group",
        height=480,
        width=1200,
        margin=dict(t=130),
    )
    return fig

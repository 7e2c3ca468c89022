"""What a direction selection leaves behind: selection.json (every candidate's scores, the choice,
the forward passes) and direction.safetensors, written atomically and read back; the cached entry
point every other stage selects through; and the score-map figure."""

from __future__ import annotations

import json
from dataclasses import asdict, fields
from pathlib import Path

from lm.cache import atomic_save_tensors, atomic_write_json
from lm.errors import UserError

from .select import DIRECTION_FILE, SELECTION_JSON, SelectionConfig, SelectionResult, SharedPrompts, select_direction
from .selection_filter import finite_or_none


def _params(cfg: SelectionConfig, fingerprint: str | None, shared_prompts: str | None = None) -> dict:
    params = dict(config=cfg.cache_key(), fingerprint=fingerprint)
    if shared_prompts is not None:  # given directions follow from the model and the prompts: no key of their own
        params["shared_prompts"] = shared_prompts
    return json.loads(json.dumps(params, sort_keys=True))


def save_selection(result: SelectionResult, out_dir: Path) -> None:
    """selection.json (scores per candidate, choice, passes) and direction.safetensors, atomically.

    The tensors are written first and both carry the same params, so a crash between the two
    writes can never pair a selection.json with another run's tensors.
    """
    out_dir = Path(out_dir)
    params = _params(result.config, result.fingerprint, result.shared_prompts)
    tensors = dict(candidates=result.directions, bypass=result.bypass, induce=result.induce, kl=result.kl)
    if result.chosen is not None:
        tensors.update(direction=result.direction, direction_raw=result.direction_raw.clone())
    atomic_save_tensors(out_dir / DIRECTION_FILE, tensors, metadata={"params": json.dumps(params, sort_keys=True)})
    chosen = None
    if result.chosen is not None:
        i, layer = result._chosen_index()
        chosen = dict(position=result.chosen[0], layer=layer, bypass_score=float(result.bypass[i, layer]),
                      induce_score=float(result.induce[i, layer]), kl_score=float(result.kl[i, layer]))
    atomic_write_json(out_dir / SELECTION_JSON, dict(
        params=params,
        chosen=chosen,
        config=asdict(result.config),
        positions=result.positions,
        n_layers=result.n_layers,
        refusal_tokens=result.refusal_token_ids,
        counts=result.counts,
        forward_passes=result.forward_passes,
        candidates=result.records(),
        prompts=result.prompts,
    ))


def load_selection(out_dir: Path) -> SelectionResult:
    from safetensors.torch import load_file

    out_dir = Path(out_dir)
    try:
        with open(out_dir / SELECTION_JSON, encoding="utf-8") as f:
            meta = json.load(f)
        tensors = load_file(str(out_dir / DIRECTION_FILE))
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read the direction selection in {out_dir}: {err}") from None
    known = {f.name for f in fields(SelectionConfig)}
    cfg = SelectionConfig(**{k: v for k, v in meta["config"].items() if k in known})
    n_pos, n_layers = len(meta["positions"]), meta["n_layers"]
    reasons = [[None] * n_layers for _ in range(n_pos)]
    for rec in meta["candidates"]:
        reasons[meta["positions"].index(rec["position"])][rec["layer"]] = rec["reason"]
    chosen = meta["chosen"]
    return SelectionResult(
        config=cfg, positions=meta["positions"], bypass=tensors["bypass"], induce=tensors["induce"], kl=tensors["kl"],
        reasons=reasons, chosen=None if chosen is None else (chosen["position"], chosen["layer"]),
        directions=tensors["candidates"], refusal_token_ids=meta["refusal_tokens"], counts=meta["counts"],
        forward_passes=meta["forward_passes"], fingerprint=meta["params"].get("fingerprint"),
        prompts=meta.get("prompts", {}), shared_prompts=meta["params"].get("shared_prompts"),
    )


def _stored_params(out_dir: Path) -> tuple[dict | None, str | None]:
    from safetensors import safe_open

    try:
        with open(out_dir / SELECTION_JSON, encoding="utf-8") as f:
            stored = json.load(f).get("params")
        with safe_open(str(out_dir / DIRECTION_FILE), framework="pt") as f:
            tensor_params = (f.metadata() or {}).get("params")
    except (OSError, ValueError):
        return None, None
    return stored, tensor_params


def select_direction_cached(model, tokenizer, out_dir: Path, cfg: SelectionConfig = SelectionConfig(), fingerprint: str | None = None,
                            shared: SharedPrompts | None = None) -> SelectionResult:
    """select_direction, reusing out_dir's artifact when its config and model fingerprint match.

    fingerprint: identifies the weights (default: lm.loading.model_fingerprint, a hash of every
    parameter; pass a known one to skip hashing).
    """
    if fingerprint is None:
        from lm.loading import model_fingerprint

        fingerprint = model_fingerprint(model)
    out_dir = Path(out_dir)
    params = _params(cfg, fingerprint, shared.digest() if shared is not None else None)
    stored, tensor_params = _stored_params(out_dir)
    if stored == params and tensor_params == json.dumps(params, sort_keys=True):
        return load_selection(out_dir)
    result = select_direction(model, tokenizer, cfg, shared)
    result.fingerprint = fingerprint
    save_selection(result, out_dir)
    return result


# --- figure ----------------------------------------------------------------------------------


def score_maps_figure(result: SelectionResult):
    """Plotly figure: bypass, induce and KL heatmaps (x = layer, y = position), choice marked."""
    from plotly.subplots import make_subplots
    import plotly.graph_objects as go

    layers = list(range(result.n_layers))
    labels = [str(p) for p in result.positions]
    maps = (("bypass score (ablate; lower = better)", result.bypass, "RdBu_r"),
            ("induce score (add; higher = better)", result.induce, "RdBu_r"),
            ("KL(baseline || ablated), harmless", result.kl, "Viridis"))
    fig = make_subplots(rows=1, cols=3, subplot_titles=[m[0] for m in maps], horizontal_spacing=0.12)
    for col, (title, values, scale) in enumerate(maps, start=1):
        z = [[finite_or_none(v) for v in row] for row in values]
        fig.add_trace(go.Heatmap(
            z=z, x=layers, y=labels, colorscale=scale, zmid=0 if scale == "RdBu_r" else None,
            colorbar=dict(title=title.split(" ")[0].split("(")[0], x=fig.layout[f"xaxis{col}"].domain[1] + 0.005, len=0.9, thickness=14),
            hovertemplate="layer %{x}<br>position %{y}<br>%{z:.3f}<extra>" + title.split(" ")[0] + "</extra>",
        ), row=1, col=col)
        if result.chosen is not None:
            fig.add_trace(go.Scatter(
                x=[result.chosen[1]], y=[str(result.chosen[0])], mode="markers", showlegend=False,
                marker=dict(symbol="x", size=12, color="black"), hoverinfo="skip",
            ), row=1, col=col)
        fig.update_xaxes(title_text="layer", row=1, col=col)
        fig.update_yaxes(title_text="position (from end)", type="category", row=1, col=col)
    chosen = "none passed the filters" if result.chosen is None else f"chosen: position {result.chosen[0]}, layer {result.chosen[1]}"
    fig.update_layout(title=f"Refusal direction candidates ({chosen})", height=420, width=1400)
    return fig

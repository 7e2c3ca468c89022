"""What a direction selection leaves behind: selection.json (every candidate's scores, the choice,
the forward passes) and direction.safetensors, written atomically and read back; the cached entry
point every other stage selects through; and the score-map figure.

selection.json carries the SHA-256 of its own content and of the tensors, so a file damaged,
edited or swapped on disk is selected again (cached) or refused (given with --selection-dir),
never read as a selection."""

from __future__ import annotations

import json
from dataclasses import asdict, fields
from pathlib import Path

from lm.cache import atomic_save_tensors, atomic_write_json, json_digest, tensors_digest, warn
from lm.errors import UserError
from lm.progress import note_computed, note_reused

from .select import DIRECTION_FILE, SELECTION_JSON, SelectionConfig, SelectionResult, SharedPrompts, select_direction
from .selection_filter import finite_or_none


def _params(cfg: SelectionConfig, fingerprint: str | None, shared_prompts: str | None = None) -> dict:
    params = dict(config=cfg.cache_key(), fingerprint=fingerprint)
    if shared_prompts is not None:  # given directions follow from the model and the prompts: no key of their own
        params["shared_prompts"] = shared_prompts
    return json.loads(json.dumps(params, sort_keys=True))


def save_selection(result: SelectionResult, out_dir: Path) -> None:
    """selection.json (scores per candidate, choice, passes) and direction.safetensors, atomically.

    The tensors are written first and selection.json records their digest, so a crash between the
    two writes can never pair a selection.json with another run's tensors.
    """
    out_dir = Path(out_dir)
    params = _params(result.config, result.fingerprint, result.shared_prompts)
    tensors = dict(candidates=result.directions, bypass=result.bypass, induce=result.induce, kl=result.kl)
    if result.chosen is not None:
        tensors.update(direction=result.direction, direction_raw=result.direction_raw.clone())
    digest = tensors_digest(tensors)
    atomic_save_tensors(
        out_dir / DIRECTION_FILE, tensors, metadata={"params": json.dumps(params, sort_keys=True), "sha256": digest}
    )
    chosen = None
    if result.chosen is not None:
        i, layer = result._chosen_index()
        chosen = dict(
            position=result.chosen[0],
            layer=layer,
            bypass_score=float(result.bypass[i, layer]),
            induce_score=float(result.induce[i, layer]),
            kl_score=float(result.kl[i, layer]),
        )
    body = json.loads(
        json.dumps(
            dict(
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
                tensors_sha256=digest,
            )
        )
    )
    atomic_write_json(out_dir / SELECTION_JSON, {**body, "sha256": json_digest(body)})


def _read(out_dir: Path) -> tuple[dict, dict]:
    """(selection.json, the tensors), verified against the digests selection.json records; a
    UserError for a file that is unreadable, altered or not the pair it was saved with."""
    from safetensors.torch import load_file

    def unreadable(path: Path, err: Exception) -> UserError:
        return UserError(
            f"cannot read the direction selection's {path}: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
        )

    try:
        with open(out_dir / SELECTION_JSON, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as err:
        raise unreadable(out_dir / SELECTION_JSON, err) from None
    try:
        tensors = load_file(str(out_dir / DIRECTION_FILE))
    except Exception as err:  # noqa: BLE001 - OSError, and safetensors' own error for a truncated or garbled file
        raise unreadable(out_dir / DIRECTION_FILE, err) from None
    if not isinstance(meta, dict):
        raise UserError(f"cannot read the direction selection in {out_dir}: selection.json is not a mapping")
    body = {k: v for k, v in meta.items() if k != "sha256"}
    if "sha256" in meta and meta["sha256"] != json_digest(body):
        raise UserError(f"{out_dir / SELECTION_JSON} does not match its content digest")
    if "tensors_sha256" in meta and meta["tensors_sha256"] != tensors_digest(tensors):
        raise UserError(f"{out_dir / DIRECTION_FILE} is not the tensors {out_dir / SELECTION_JSON} was saved with")
    return meta, tensors


def load_selection(out_dir: Path) -> SelectionResult:
    out_dir = Path(out_dir)
    meta, tensors = _read(out_dir)
    try:
        known = {f.name for f in fields(SelectionConfig)}
        cfg = SelectionConfig(**{k: v for k, v in meta["config"].items() if k in known})
        n_pos, n_layers = len(meta["positions"]), meta["n_layers"]
        reasons = [[None] * n_layers for _ in range(n_pos)]
        for rec in meta["candidates"]:
            reasons[meta["positions"].index(rec["position"])][rec["layer"]] = rec["reason"]
        chosen = meta["chosen"]
        return SelectionResult(
            config=cfg,
            positions=meta["positions"],
            bypass=tensors["bypass"],
            induce=tensors["induce"],
            kl=tensors["kl"],
            reasons=reasons,
            chosen=None if chosen is None else (chosen["position"], chosen["layer"]),
            directions=tensors["candidates"],
            refusal_token_ids=meta["refusal_tokens"],
            counts=meta["counts"],
            forward_passes=meta["forward_passes"],
            fingerprint=meta["params"].get("fingerprint"),
            prompts=meta.get("prompts", {}),
            shared_prompts=meta["params"].get("shared_prompts"),
        )
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as err:
        raise UserError(f"cannot read the direction selection in {out_dir}: missing or malformed {err}") from None


def _cached(out_dir: Path, params: dict) -> SelectionResult | None:
    """The selection stored in out_dir for `params`, verified; None when there is none, it was made
    with other settings, or it fails its check (then with one warning line)."""
    if not (out_dir / SELECTION_JSON).exists() and not (out_dir / DIRECTION_FILE).exists():
        return None
    try:
        meta, _ = _read(out_dir)
        if meta.get("params") != params:
            return None
        if "sha256" not in meta or "tensors_sha256" not in meta:
            raise UserError(f"{out_dir / SELECTION_JSON} has no content digest (saved by an older version)")
        return load_selection(out_dir)
    except UserError as e:
        warn(f"{e}; selecting again")
        return None


def select_direction_cached(
    model,
    tokenizer,
    out_dir: Path,
    cfg: SelectionConfig = SelectionConfig(),
    fingerprint: str | None = None,
    shared: SharedPrompts | None = None,
) -> SelectionResult:
    """select_direction, reusing out_dir's artifact when its config and model fingerprint match and
    its files verify.

    fingerprint: identifies the weights (default: lm.loading.model_fingerprint, a hash of every
    parameter; pass a known one to skip hashing).
    """
    if fingerprint is None:
        from lm.loading import model_fingerprint

        fingerprint = model_fingerprint(model)
    out_dir = Path(out_dir)
    params = _params(cfg, fingerprint, shared.digest() if shared is not None else None)
    cached = _cached(out_dir, params)
    if cached is not None:
        note_reused(out_dir / SELECTION_JSON)
        return cached
    result = select_direction(model, tokenizer, cfg, shared)
    result.fingerprint = fingerprint
    save_selection(result, out_dir)
    note_computed(out_dir / SELECTION_JSON)
    return result


# --- figure ----------------------------------------------------------------------------------


def score_maps_figure(result: SelectionResult):
    """Plotly figure: bypass, induce and KL heatmaps (x = layer, y = position), choice marked."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    layers = list(range(result.n_layers))
    labels = [str(p) for p in result.positions]
    maps = (
        ("bypass score (ablate; lower = better)", result.bypass, "RdBu_r"),
        ("induce score (add; higher = better)", result.induce, "RdBu_r"),
        ("KL(baseline || ablated), harmless", result.kl, "Viridis"),
    )
    fig = make_subplots(rows=1, cols=3, subplot_titles=[m[0] for m in maps], horizontal_spacing=0.12)
    for col, (title, values, scale) in enumerate(maps, start=1):
        z = [[finite_or_none(v) for v in row] for row in values]
        fig.add_trace(
            go.Heatmap(
                z=z,
                x=layers,
                y=labels,
                colorscale=scale,
                zmid=0 if scale == "RdBu_r" else None,
                colorbar=dict(
                    title=title.split(" ")[0].split("(")[0],
                    x=fig.layout[f"xaxis{col}"].domain[1] + 0.005,
                    len=0.9,
                    thickness=14,
                ),
                hovertemplate="layer %{x}<br>position %{y}<br>%{z:.3f}<extra>" + title.split(" ")[0] + "</extra>",
            ),
            row=1,
            col=col,
        )
        if result.chosen is not None:
            fig.add_trace(
                go.Scatter(
                    x=[result.chosen[1]],
                    y=[str(result.chosen[0])],
                    mode="markers",
                    showlegend=False,
                    marker=dict(symbol="x", size=12, color="black"),
                    hoverinfo="skip",
                ),
                row=1,
                col=col,
            )
        fig.update_xaxes(title_text="layer", row=1, col=col)
        fig.update_yaxes(title_text="position (from end)", type="category", row=1, col=col)
    chosen = (
        "none passed the filters"
        if result.chosen is None
        else f"chosen: position {result.chosen[0]}, layer {result.chosen[1]}"
    )
    # Blank cells are candidates with no score: the lazy search and the prescreen skip those that
    # cannot win, the last 20% of layers are never eligible, and a zero direction has no score.
    skipped = (
        ""
        if result.config.search == "exhaustive" and not result.config.prescreen_n_val
        else "not scored (lazy search / prescreen: cannot win), "
    )
    fig.update_layout(
        title=f"Refusal direction candidates ({chosen}; x marks it)<br><sup>blank: {skipped}a late layer "
        f"(>= {int(result.config.max_layer_fraction * result.n_layers)}, never eligible) or a zero direction</sup>",
        height=440,
        width=1150,
        margin=dict(t=110),
    )
    return fig

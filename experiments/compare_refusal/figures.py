"""The main job's figures: behaviour, per-layer cosines, probes, repairs and, with selection, the
direction's source, cosine maps and quality; saved beside the report and optionally exported."""

from __future__ import annotations

from pathlib import Path

import torch

from lm.cache import atomic_write_text, write_plotlyjs
from refusal.compare import cosine_heatmaps_figure, quality_bars_figure, source_shift_figure
from refusal.selection_artifacts import score_maps_figure

from .probe_report import probe_transfer_figure, refusal_probe_figure
from .report import asr_figure, cosine_per_layer_figure


def make_figures(results: dict, report: dict) -> dict:
    """Plotly figures of the comparison: behaviour, per-layer cosines and, with selection, the direction."""
    figs = {"asr": asr_figure(report), "cosine_per_layer": cosine_per_layer_figure(report)}
    if any((v.get("refusal_probes") or {}).get("fitted") for v in report["variants"]):
        figs["refusal_probes"] = refusal_probe_figure(report)
    if any(v.get("probes") for v in report["variants"]):
        figs["probe_transfer"] = probe_transfer_figure(report)
        cell = report["probe_cell"]
        accuracy = {
            v["variant"]: torch.tensor([[a["value"] for a in row] for row in v["probes"]["own_map"]])
            for v in report["variants"]
            if v.get("probes")
        }
        figs["probe_accuracy_maps"] = cosine_heatmaps_figure(
            accuracy,
            report["positions"],
            (cell["position"], cell["layer"]),
            "Held-out accuracy of each model's own harmfulness probes (x: the probe cell)",
            value="accuracy",
            zrange=(0.5, 1),
            colorscale="Viridis",
            reverse=False,
        )
    if report.get("repairs"):
        from repair.figures import before_after_figure, curve_figure
        from repair.front_report import front_figure
        from repair.report import file_slug

        for variant, r in report["repairs"].items():
            figs[f"repair_{file_slug(variant)}"] = before_after_figure(r, f"Repair before/after: {variant}")
            if r.get("front"):
                figs[f"repair_front_{file_slug(variant)}"] = front_figure(r, f"Repair front: {variant}")
        if any(r.get("curve") for r in report["repairs"].values()):
            figs["repair_curve"] = curve_figure({v: r for v, r in report["repairs"].items() if r.get("curve")})
    ref = results["original"][1].get("selection")
    if ref is None:
        return figs
    figs["score_maps_original"] = score_maps_figure(ref)
    maps = {
        v["variant"]: torch.tensor(v["cosine_to_original_direction"])
        for v in report["variants"]
        if "cosine_to_original_direction" in v
    }
    if not maps:  # the original has no selected direction: nothing to compare against
        return figs
    figs["cosine_maps"] = cosine_heatmaps_figure(
        maps,
        ref.positions,
        ref.chosen,
        "Cosine of each variant's candidate directions to the original's chosen direction",
    )
    # Only variants whose selection ran: a None source then means nothing passed the filters.
    sources = {
        v["variant"]: (v["source"]["position"], v["source"]["layer"]) if v.get("source") else None
        for v in report["variants"]
        if v.get("source_shift") is not None
    }
    if len(sources) > 1:  # the original's source alone shifts nothing
        title = (
            "Chosen refusal-direction source per variant<br><sup>pos: post-instruction token (-1 = the last prompt token); "
            "every variant selected on the original's filtered prompts</sup>"
        )
        figs["source_shift"] = source_shift_figure(
            sources, report["n_layers"], title, reference=report["variants"][0]["variant"]
        )
    figs["quality"] = quality_bars_figure(
        [dict(variant=v["variant"], label=v.get("label"), **(v.get("quality") or {})) for v in report["variants"]],
        "Direction quality: each variant's own direction vs the original's direction inside it",
    )
    return figs


def export_figures(figs: dict, where: str) -> list[str]:
    """Copy the figures to --figures-dir as HTML and, when a browser for kaleido is there, PNG."""
    from ..figures import export

    return export(figs, Path(where))


def save_figures(run_dir: Path, figs: dict) -> dict:
    """Each figure as a standalone HTML file in <run>/figures/ (plotly.js written once beside them)."""
    fig_dir = run_dir / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    write_plotlyjs(fig_dir)
    written = {}
    for name, fig in figs.items():
        path = fig_dir / f"{name}.html"
        atomic_write_text(path, fig.to_html(include_plotlyjs="directory", full_html=True))
        written[name] = str(path.relative_to(run_dir))
    return written

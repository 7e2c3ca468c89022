"""Plotly error bars from rate objects (refusal.stats: value and 95% interval), for every figure
that draws a rate."""

from __future__ import annotations


def error_bars(rates: list[dict | None]) -> dict:
    """Plotly asymmetric error bars (percentage points) from rate objects; a missing rate gets none."""
    up = [0 if r is None else 100 * (r["ci95"][1] - r["value"]) for r in rates]
    down = [0 if r is None else 100 * (r["value"] - r["ci95"][0]) for r in rates]
    return dict(type="data", symmetric=False, array=up, arrayminus=down, visible=any(r is not None for r in rates))

"""Arditi et al.'s filter and choice among scored candidates (pure functions on the score grids):
a candidate is rejected for a NaN or infinite score, a late layer, KL above the threshold or a
negative induce score; the lowest bypass score among the rest wins."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .select import SelectionConfig


def finite_or_none(x: torch.Tensor) -> float | None:
    # JSON has no NaN; a missing score reads as null.
    value = float(x)
    return value if math.isfinite(value) else None


def rejection_reasons(bypass: torch.Tensor, induce: torch.Tensor, kl: torch.Tensor, cfg: SelectionConfig) -> list[list[str | None]]:
    """Arditi et al.'s filter per candidate, first failing rule in their order; None = passes."""
    n_pos, n_layers = bypass.shape
    last_allowed = int(cfg.max_layer_fraction * n_layers)
    reasons = []
    for i in range(n_pos):
        row = []
        for layer in range(n_layers):
            b, s, k = float(bypass[i, layer]), float(induce[i, layer]), float(kl[i, layer])
            if any(math.isnan(v) for v in (b, s, k)):
                row.append("nan")
            elif any(math.isinf(v) for v in (b, s, k)):
                row.append("infinite")  # e.g. a refusal log-odds of -inf would otherwise win the argmin
            elif layer >= last_allowed:
                row.append("late_layer")
            elif k > cfg.kl_threshold:
                row.append("kl")
            elif s < cfg.induce_threshold:
                row.append("induce")
            else:
                row.append(None)
        reasons.append(row)
    return reasons


def choose(bypass: torch.Tensor, reasons: list[list[str | None]], positions: list[int]) -> tuple[int, int] | None:
    """(position, layer) with the lowest bypass score among passing candidates; ties go to the first."""
    best = None
    for i, pos in enumerate(positions):
        for layer, reason in enumerate(reasons[i]):
            if reason is None and (best is None or float(bypass[i, layer]) < best[0]):
                best = (float(bypass[i, layer]), pos, layer)
    return None if best is None else (best[1], best[2])

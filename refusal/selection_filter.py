"""Arditi et al.'s filter and choice among scored candidates (pure functions on the score grids):
a candidate is rejected for a NaN or infinite score, a late layer, KL above the threshold or a
negative induce score; the lowest bypass score among the rest wins."""

from __future__ import annotations

import math
from typing import Protocol

import torch


class FilterThresholds(Protocol):
    """What the filter reads from a selection config (refusal.select.SelectionConfig has them)."""

    max_layer_fraction: float
    kl_threshold: float
    induce_threshold: float


def finite_or_none(x: torch.Tensor) -> float | None:
    # JSON has no NaN; a missing score reads as null.
    value = float(x)
    return value if math.isfinite(value) else None


def rejection_reasons(
    bypass: torch.Tensor, induce: torch.Tensor, kl: torch.Tensor, cfg: FilterThresholds
) -> list[list[str | None]]:
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


def reason_counts(reasons: list[list[str | None]]) -> dict[str, int]:
    """How many candidates each rule rejected ('passed' for the rest)."""
    counts: dict[str, int] = {}
    for row in reasons:
        for reason in row:
            counts[reason or "passed"] = counts.get(reason or "passed", 0) + 1
    return counts


def non_finite_note(reasons: list[list[str | None]]) -> str | None:
    """The sentence a report gives when scores were NaN or infinite (they are excluded, never chosen)."""
    counts = reason_counts(reasons)
    bad = counts.get("nan", 0) + counts.get("infinite", 0)
    if not bad:
        return None
    return (
        f"{bad} candidate direction(s) had a NaN or infinite bypass / induce / KL score (e.g. a zero difference of means, "
        "or a refusal probability of exactly 0 or 1 in low precision) and were excluded from the choice"
    )


def no_direction_reason(reasons: list[list[str | None]], baseline_harmful: float | None) -> str:
    """Why no candidate was chosen, in one line: the rules that rejected them, and whether the model
    refuses at all (the mean refusal score, log-odds of its refusal tokens, on harmful prompts)."""
    counts = ", ".join(f"{n} {reason}" for reason, n in sorted(reason_counts(reasons).items()))
    line = f"no candidate direction passed selection (rejections: {counts})"
    if baseline_harmful is not None and math.isfinite(baseline_harmful) and baseline_harmful <= 0:
        line += (
            f"; the model does not appear to refuse: its mean refusal score on the harmful validation prompts is "
            f"{baseline_harmful:.2f} (log-odds of its refusal tokens; a refusing model scores above 0), so it has no refusal direction to find"
        )
    return line

"""One row of a benchmark table: a baseline and a fast implementation measured side by side.

A row is a dict: comparison, baseline / fast (implementation names), baseline_s / fast_s (wall
clock) and baseline_cpu_s / fast_cpu_s (CPU time), speedup / cpu_speedup (baseline time / fast
time by either clock; for generation a tokens/s ratio), baseline_mib / fast_mib (peak extra
memory, see benchmarks.measure), check (do the results agree) and note.
"""

from __future__ import annotations


def row(
    comparison: str, baseline: str, fast: str, base, quick, check: str = "", note: str = "", work: float | None = None
) -> dict:
    """A table row from two benchmarks.measure.Measurement (baseline may be None: fast alone).

    work: the amount of work done by the fast side relative to the baseline (generation: its
    tokens / the baseline's tokens), so speed-ups are rates, not just time ratios.
    """

    def ratio(a, b):
        return None if base is None else (a / max(b, 1e-9)) * (work or 1.0)

    return dict(
        comparison=comparison,
        baseline=baseline,
        fast=fast,
        baseline_s=None if base is None else base.seconds,
        fast_s=quick.seconds,
        baseline_cpu_s=None if base is None else base.cpu_seconds,
        fast_cpu_s=quick.cpu_seconds,
        speedup=None if base is None else ratio(base.seconds, quick.seconds),
        cpu_speedup=None if base is None else ratio(base.cpu_seconds, quick.cpu_seconds),
        baseline_mib=None if base is None else base.peak_mib,
        fast_mib=quick.peak_mib,
        resident_mib=quick.resident_mib,
        peak_exact=quick.peak_exact and (base is None or base.peak_exact),
        check=check,
        note=note,
    )

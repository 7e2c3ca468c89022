"""How brittle is safety (`python -m experiments.brittleness`): the sweep and its command line in
sweep.py, the sweep's points and settings in config.py, its report and figure in report.py."""

from .config import JUDGES, METHODS, RANK_METHODS, WEIGHT_METHODS, BrittlenessConfig, Point, sweep_points
from .report import brittleness_figure, curves, render_markdown
from .sweep import Brittleness, full_ranks, main, parse_args, rank_fraction

__all__ = [
    "Brittleness",
    "BrittlenessConfig",
    "JUDGES",
    "METHODS",
    "Point",
    "RANK_METHODS",
    "WEIGHT_METHODS",
    "brittleness_figure",
    "curves",
    "full_ranks",
    "main",
    "parse_args",
    "rank_fraction",
    "render_markdown",
    "sweep_points",
]

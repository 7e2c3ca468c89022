"""The main job (`python -m experiments.compare_refusal`): its command line in cli.py, its settings
in config.py, its stages in comparison.py, the repair stage in repairs.py, the report's content in
summary.py, its text in report.py (key_findings.py, probe_report.py) and its figures in figures.py."""

from .cli import DEFAULT_VARIANTS, QUICK_VARIANTS, CompareConfig, Comparison, main, parse_args, validate

__all__ = ["CompareConfig", "Comparison", "DEFAULT_VARIANTS", "QUICK_VARIANTS", "main", "parse_args", "validate"]

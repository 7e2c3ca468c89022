"""The main job: how compression changes a chat model's refusal behaviour and refusal directions.

    python -m experiments.compare_refusal                 # embedded model, default variants
    python -m experiments.compare_refusal --quick         # every stage in minutes (--size quick)
    python -m experiments.compare_refusal --model Qwen/Qwen2.5-7B-Instruct --variants wanda:0.5 wanda:2:4

For the original and every variant: vanilla ASR on held-out harmful prompts (AdvBench and
JailbreakBench by default, none of them used to fit anything; both judges, per prompt) and the
refusal rate on held-out harmless prompts (over-refusal), each with a 95% interval and an exact
McNemar test against the original (Holm-corrected over the variants), wikitext-2 perplexity and
zero-shot accuracy with bootstrap intervals, a collapse check, difference-of-means directions at
every layer and post-instruction position and their cosine to the original's, the original's
selected direction (Arditi et al.) and its quality inside each variant, harmfulness probes (does
the model still recognise harm?) and refusal-prediction probes (does the activation predict its
own refusal?); then AIRD and targeted repair of every variant whose direction changed. One report (markdown, self-contained HTML, JSON).
Each stage leaves an artifact in runs/<name>/ and is reused on a rerun with the same settings, so
an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from compression.variants import parse_variant
from lm.cli import parse_config
from lm.errors import UserError, cli
from lm.loading import check_model_spec
from refusal.judge_spec import judge_panel

from .comparison import Comparison
from .config import DEFAULT_VARIANTS, QUICK_VARIANTS, CompareConfig

__all__ = ["CompareConfig", "Comparison", "DEFAULT_VARIANTS", "QUICK_VARIANTS", "main", "parse_args", "validate"]


def parse_args(argv=None) -> CompareConfig:
    """Flags generated from CompareConfig's fields (lm.cli), over the size's values (--size, by device
    when not given; --quick is --size quick)."""
    cfg, _ = parse_config(
        CompareConfig,
        argv,
        prog="python -m experiments.compare_refusal",
        description=__doc__.split("\n\n")[0],
        sized=CompareConfig.sized,
    )
    if cfg.size == "quick" and cfg.name is None:
        cfg = dataclasses.replace(cfg, name="quick-" + Path(cfg.model).name.replace("/", "-"))
    return cfg


def validate(cfg: CompareConfig) -> None:
    """What can be checked without the model, before it loads or anything is written (the config
    checked its own values): the model path, every variant spec and every judge's directory."""
    check_model_spec(cfg.model)
    judge_panel(cfg.judges)
    slugs = [parse_variant(v).slug for v in cfg.variants]
    if len(set(slugs)) != len(slugs) or "original" in slugs:
        raise UserError(f"duplicate variants in {list(cfg.variants)}")


@cli
def main(argv=None) -> int:
    cfg = parse_args(argv)
    validate(cfg)
    Comparison(cfg).run()
    return 0

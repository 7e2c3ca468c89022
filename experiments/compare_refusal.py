"""The main job: how compression changes a chat model's refusal behaviour and refusal directions.

    python -m experiments.compare_refusal                 # embedded model, default variants
    python -m experiments.compare_refusal --quick         # CI-sized
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

import argparse
import sys
from pathlib import Path

from compression.calibration import TEXT_SOURCE
from compression.variants import parse_variant
from lm.errors import cli
from lm.zero_shot import task_names
from refusal.measure import add_eval_arguments, eval_overrides

from .compare_config import DEFAULT_VARIANTS, QUICK_VARIANTS, CompareConfig
from .comparison import Comparison

# The job's public names; the stages live in comparison.py, the report's content in compare_summary.py
# and its figures in compare_figures.py.
__all__ = ["CompareConfig", "Comparison", "DEFAULT_VARIANTS", "QUICK_VARIANTS", "main", "parse_args"]


def parse_args(argv=None) -> CompareConfig:
    p = argparse.ArgumentParser(prog="python -m experiments.compare_refusal", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="embedded", help="'embedded', a hub id, a local safetensors directory, or a .gguf file")
    p.add_argument("--variants", nargs="+", default=None, help=f"variant specs (default: {' '.join(DEFAULT_VARIANTS)}); e.g. wanda:0.6 wanda:2:4 magnitude:0.5 rtn:int4:g32")
    p.add_argument("--name", default=None, help="run directory name (default compare-<model>)")
    p.add_argument("--runs-dir", default="runs")
    p.add_argument("--quick", action="store_true", help="CI-sized run: few prompts, short generations")
    add_eval_arguments(p, n_asr=CompareConfig.n_asr, n_harmless=CompareConfig.n_harmless)
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--n-train", type=int)
    p.add_argument("--ppl-windows", type=int)
    p.add_argument("--ppl-seqlen", type=int)
    p.add_argument("--calib-samples", type=int, help="calibration samples (default 128)")
    p.add_argument("--calib-source", choices=["harmless", TEXT_SOURCE],
                   help="Wanda / SparseGPT / GPTQ calibration: harmless instructions (default) or wikitext text windows")
    p.add_argument("--calib-seqlen", type=int, help="calibration tokens per sample (default 256)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--no-checkpoints", action="store_true", help="do not save variant checkpoints")
    p.add_argument("--figures-dir", help="also export the figures here as HTML and PNG (e.g. figures/)")
    p.add_argument("--no-selection", action="store_true", help="skip refusal-direction selection (and everything built on it)")
    p.add_argument("--select-variants", action=argparse.BooleanOptionalAction, default=None,
                   help="select every variant's own direction too, on the original's prompts (default: on)")
    p.add_argument("--n-val", type=int, help="validation prompts per class for selection (default 32)")
    p.add_argument("--search", choices=["exhaustive", "lazy"], help="selection search (default lazy: same choice, fewer passes)")
    p.add_argument("--prescreen", type=int, help="prescreen candidates on this many harmful prompts (0 = off; default 8)")
    p.add_argument("--n-ablation-asr", type=int, help="prompts of each evaluation set generated with the original's direction ablated (default 16)")
    p.add_argument("--zero-shot-limit", type=int, help="zero-shot documents per task (0 = skip; default 200 on GPU, 24 on CPU)")
    p.add_argument("--zero-shot-tasks", nargs="+", help="zero-shot tasks, or 'all' (default: all 7 on GPU, boolq rte winogrande arc_easy on CPU)")
    p.add_argument("--probes", action=argparse.BooleanOptionalAction, default=None,
                   help="harmfulness probes per (position, layer) with transfer of the original's to each variant (default: on)")
    p.add_argument("--n-refusal-probe", type=int, help="harmful training prompts each model generates to fit its refusal-prediction probe "
                   f"(0 = skip; default {CompareConfig.n_refusal_probe})")
    p.add_argument("--repair", action=argparse.BooleanOptionalAction, default=None,
                   help="AIRD + targeted repair of every variant whose direction changed (default: on)")
    p.add_argument("--repair-n-asr", type=int, help="prompts of each evaluation set in the repair's evaluation (default: --n-asr)")
    a = p.parse_args(argv)
    overrides = {k: v for k, v in dict(
        model=a.model, variants=tuple(a.variants) if a.variants else None, name=a.name, runs_dir=a.runs_dir,
        n_asr=a.n_asr, max_new_tokens=a.max_new_tokens, n_train=a.n_train, ppl_windows=a.ppl_windows, ppl_seqlen=a.ppl_seqlen,
        calib_samples=a.calib_samples, calib_source=a.calib_source, calib_seqlen=a.calib_seqlen, batch_size=a.batch_size, seed=a.seed, dtype=a.dtype,
        select_variants=a.select_variants, n_val=a.n_val, search=a.search, prescreen_n_val=a.prescreen,
        n_ablation_asr=a.n_ablation_asr, figures_dir=a.figures_dir, zero_shot_limit=a.zero_shot_limit, repair=a.repair,
        zero_shot_tasks=task_names(a.zero_shot_tasks), repair_n_asr=a.repair_n_asr, probes=a.probes, n_refusal_probe=a.n_refusal_probe,
    ).items() if v is not None}
    overrides.update(eval_overrides(a))
    if a.no_selection:
        overrides["select"] = False
    if a.no_checkpoints:
        overrides["save_checkpoints"] = False
    if a.quick and "name" not in overrides:
        overrides["name"] = "quick-" + Path(a.model).name.replace("/", "-")
    return CompareConfig.quick(**overrides) if a.quick else CompareConfig(**overrides)


@cli
def main(argv=None) -> int:
    cfg = parse_args(argv)
    for v in cfg.variants:
        parse_variant(v)  # fail on a bad spec before loading anything
    Comparison(cfg).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())

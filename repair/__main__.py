"""python -m repair --original <id|dir|embedded> --compressed <dir> --out <dir>"""

from __future__ import annotations

import argparse
import sys

from lm.errors import UserError, cli
from lm.zero_shot import task_names
from refusal.measure import add_eval_arguments, eval_overrides

from .aird import AirdConfig
from .pipeline import Repair, RepairConfig
from .targeted import TargetedConfig


def parse_args(argv=None) -> RepairConfig:
    p = argparse.ArgumentParser(prog="python -m repair", description=(
        "Repair a compressed checkpoint's refusal: AIRD (restore the one decoder block before the original refusal "
        "direction's source that best brings refusal back) and a targeted restoration of far fewer weights."))
    p.add_argument("--original", default="embedded", help="the uncompressed model: 'embedded', a hub id, a local directory or a .gguf file")
    p.add_argument("--compressed", required=True, help="the compressed checkpoint (a Hugging Face directory with safetensors)")
    p.add_argument("--out", required=True, help="output directory: the repaired checkpoint, repair.json, repair.md, figures/")
    p.add_argument("--runs-dir", default="runs/repair", help="where stage artifacts are cached (default runs/repair)")
    p.add_argument("--source", type=int, nargs=2, metavar=("POSITION", "LAYER"),
                   help="use the original's difference-of-means direction at this (negative position, layer) instead of its selected one")
    p.add_argument("--layer", type=int, help="restore this block instead of choosing one")
    p.add_argument("--window", type=int, default=4, help="candidate blocks: this many before the source layer (default 4)")
    p.add_argument("--kl-max", type=float, default=0.1, help="largest KL on harmless prompts a chosen block may cause (default 0.1)")
    p.add_argument("--no-targeted", action="store_true", help="skip the targeted restoration")
    p.add_argument("--targeted-objective", choices=["own_refusals", "refusal", "projection"], default="own_refusals",
                   help="what targeted attribution scores: the likelihood of the original's own refusals (default), the "
                        "first-token refusal score, or the projection onto the direction at its source")
    p.add_argument("--save", choices=["aird", "targeted"], default="aird", help="which repaired model to write (default aird)")
    p.add_argument("--curve-fractions", type=float, nargs="*", default=[0.01, 0.03, 0.1, 0.3],
                   help="restored fractions of AIRD's count at which vanilla ASR is measured for the curve")
    add_eval_arguments(p, n_asr=RepairConfig.n_asr, n_harmless=RepairConfig.n_harmless, store_default="runs/measurements, the main job's")
    p.add_argument("--curve-n-asr", type=int, help="prompts of each set for the restoration curve's points (default --n-asr)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--no-adv-suffix", action="store_true", help="skip the adversarial-suffix ASR")
    p.add_argument("--n-train", type=int, default=128)
    p.add_argument("--n-val", type=int, default=32)
    p.add_argument("--ppl-windows", type=int, default=8)
    p.add_argument("--zero-shot-limit", type=int, default=200, help="documents per task; 0 skips zero-shot, -1 = full splits")
    p.add_argument("--zero-shot-tasks", nargs="+", help="subset of boolq rte hellaswag winogrande arc_easy arc_challenge openbookqa, or all (default all)")
    p.add_argument("--select-compressed", action=argparse.BooleanOptionalAction, default=None,
                   help="also select the compressed model's own direction (source shift); default: on GPU only")
    p.add_argument("--probes", action=argparse.BooleanOptionalAction, default=RepairConfig.probes,
                   help="harmfulness and refusal-prediction probes of every state, before and after repair (default: on)")
    p.add_argument("--n-refusal-probe", type=int, default=RepairConfig.n_refusal_probe,
                   help=f"harmful training prompts the original generates to fit its refusal-prediction probe (0 = skip; default {RepairConfig.n_refusal_probe})")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.zero_shot_limit < -1:
        raise UserError(f"--zero-shot-limit must be -1, 0 or positive, got {a.zero_shot_limit}")
    if a.batch_size is not None and a.batch_size <= 0:
        raise UserError(f"--batch-size must be positive, got {a.batch_size}")
    return RepairConfig(
        original=a.original, compressed=a.compressed, out=a.out, runs_dir=a.runs_dir, dtype=a.dtype, seed=a.seed,
        n_train=a.n_train, n_val=a.n_val, select_compressed=a.select_compressed,
        source=tuple(a.source) if a.source else None,
        aird=AirdConfig(window=a.window, kl_max=a.kl_max, layer=a.layer), targeted=not a.no_targeted,
        targeted_cfg=TargetedConfig(objective=a.targeted_objective),
        curve_fractions=tuple(a.curve_fractions), save=a.save, n_asr=a.n_asr or RepairConfig.n_asr, max_new_tokens=a.max_new_tokens,
        curve_n_asr=a.curve_n_asr, **{"measurements_dir": "runs/measurements", **eval_overrides(a)},
        adv_suffix=not a.no_adv_suffix, ppl_windows=a.ppl_windows,
        zero_shot_limit=None if a.zero_shot_limit == -1 else a.zero_shot_limit,
        zero_shot_tasks=task_names(a.zero_shot_tasks), batch_size=a.batch_size, probes=a.probes, n_refusal_probe=a.n_refusal_probe,
    )


@cli
def main(argv=None) -> int:
    Repair(parse_args(argv)).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())

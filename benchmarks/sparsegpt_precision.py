"""`python -m benchmarks.sparsegpt_precision`: why the toolkit's SparseGPT and llm-compressor's differ.

    python -m benchmarks.maintained --rows sparsegpt24 --libraries llmcompressor   # first: both models, measured
    python -m benchmarks.sparsegpt_precision                                       # then this (~30 min on 2 cores)

Both implement the same algorithm; llm-compressor accumulates and inverts the Hessian in float32,
the toolkit in float64. Two measurements separate "a different algorithm" from "the same one in
another precision":

1. Masks, block by block. Block 0 sees identical inputs in both, so its masks show whether the
   per-layer computation agrees. Block 1 is pruned twice by the toolkit: on the inputs its own block 0
   produces, and on those llm-compressor's block 0 produces. If only the second reproduces
   llm-compressor's masks, the implementations agree and their difference is carried forward from
   block 0's few differing choices.
2. The toolkit's whole run again with a float32 Hessian (`SparseGPTConfig.precision`), its
   wikitext-2 perplexity on the maintained benchmark's windows, paired with the toolkit's float64
   model and llm-compressor's (paired bootstrap ratio, exact Wilcoxon).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from lm.cache import measured, timed
from lm.cli import parse_config
from lm.errors import UserError, cli

BEGIN, END = (
    "<!-- python -m benchmarks.sparsegpt_precision: begin -->",
    "<!-- python -m benchmarks.sparsegpt_precision: end -->",
)


@dataclass(frozen=True)
class PrecisionRun:
    model: str = "embedded"
    pattern: str = "2:4"
    maintained: str = "runs/maintained/models/llmcompressor-sparsegpt-2-4"  # llm-compressor's pruned checkpoint
    calibration_samples: int = 128
    ppl_windows: int = 8
    measurements_dir: str = "runs/measurements"
    results: str = str(Path(__file__).with_name("RESULTS.md"))
    write: bool = True


def mask_agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a == 0) == (b == 0)).float().mean())


@torch.no_grad()
def block_masks(model, calibration, pattern, maintained: dict[str, torch.Tensor]) -> list[tuple[str, str, float]]:
    """(block, linear, agreement with llm-compressor) for the comparisons of the module docstring."""
    from compression.blockwise import block0_inputs, collect, run_block
    from compression.sparsegpt import Hessian, SparseGPTConfig, sparsegpt_prune
    from lm.architecture import block_linears, block_prefix
    from lm.hooks import decoder_layers

    blocks = decoder_layers(model)
    theirs = {
        i: {n: maintained[block_prefix(model, i) + n + ".weight"].float() for n in block_linears(blocks[i])}
        for i in (0, 1)
    }
    states = block0_inputs(model, calibration)
    rows, originals = [], {n: lin.weight.detach().clone() for n, lin in block_linears(blocks[0]).items()}
    hessians = collect(blocks[0], states, Hessian)
    for precision in ("float64", "float32"):
        for name, lin in block_linears(blocks[0]).items():
            ours = sparsegpt_prune(
                originals[name], hessians[name].matrix(), pattern, SparseGPTConfig(precision=precision)
            )
            rows.append(("0", f"{name} (toolkit, {precision})", mask_agreement(ours, theirs[0][name])))
            if precision == "float64":
                lin.weight.copy_(ours)
    for source in ("toolkit's", "llm-compressor's"):
        if source != "toolkit's":
            for name, lin in block_linears(blocks[0]).items():
                lin.weight.copy_(theirs[0][name])
        hessians = collect(blocks[1], run_block(blocks[0], states), Hessian)
        for name, lin in block_linears(blocks[1]).items():
            ours = sparsegpt_prune(lin.weight, hessians[name].matrix(), pattern)
            rows.append(("1", f"{name} (toolkit, float64, on {source} block 0)", mask_agreement(ours, theirs[1][name])))
    for name, lin in block_linears(blocks[0]).items():
        lin.weight.copy_(originals[name])
    return rows


@cli
def main(argv=None) -> int:
    from safetensors.torch import load_file

    from compression.calibration import CalibrationConfig, calibration_set
    from compression.sparsegpt import prune_sparsegpt
    from compression.sparsity import SparsityPattern
    from lm.loading import load_model, model_fingerprint
    from lm.perplexity import PerplexityConfig, measure_perplexity
    from refusal.measure import perplexity_rate
    from refusal.stats import add_holm, fmt_value_ci, paired_perplexity_ratio

    argv = sys.argv[1:] if argv is None else list(argv)
    a = parse_config(
        PrecisionRun, argv, prog="python -m benchmarks.sparsegpt_precision", description=__doc__.split("\n\n")[0]
    )[0]
    fp_file = Path(a.maintained) / "benchmark_fingerprint.json"
    if not fp_file.is_file():
        raise UserError(
            f"no measured llm-compressor checkpoint in {a.maintained}: run python -m benchmarks.maintained --rows sparsegpt24 first"
        )
    base = load_model(a.model)
    fingerprint = model_fingerprint(base.model)
    calibration = calibration_set(base.tokenizer, CalibrationConfig(n_samples=a.calibration_samples))
    pattern = SparsityPattern.parse(a.pattern)
    store, pcfg = Path(a.measurements_dir), PerplexityConfig(windows=a.ppl_windows, seqlen=512)

    def stored(model_id, what):
        def missing():
            raise UserError(
                f"the perplexity of {what} is not in {store}: run python -m benchmarks.maintained with this row first"
            )

        return measured(store, "perplexity", model_id, [pcfg], missing)

    variant = f"sparsegpt:{a.pattern}"
    float64 = stored(
        dict(base=fingerprint, variant=variant, calibration=calibration.digest), "the toolkit's float64 model"
    )
    theirs = stored(json.loads(fp_file.read_text())["fingerprint"], "llm-compressor's model")
    maintained = {}
    for f in sorted(Path(a.maintained).glob("*.safetensors")):
        maintained.update(load_file(f))
    masks = block_masks(base.model, calibration, pattern, maintained)
    del maintained

    def float32_model():
        prune_sparsegpt(base.model, calibration, pattern, precision="float32")
        return timed(lambda: measure_perplexity(base.model, base.tokenizer, pcfg))

    float32 = measured(
        store,
        "perplexity",
        dict(base=fingerprint, variant=variant, calibration=calibration.digest, precision="float32"),
        [pcfg],
        float32_model,
    )
    t = float64["window_tokens"]
    pairs = [
        ("toolkit float32 / toolkit float64", float32, float64),
        ("llm-compressor / toolkit float64", theirs, float64),
        ("llm-compressor / toolkit float32", theirs, float32),
    ]
    tests = [paired_perplexity_ratio(x["window_nll"], y["window_nll"], t) for _, x, y in pairs]
    add_holm(tests)
    from .__main__ import heading, machine

    lines = [
        BEGIN,
        heading("python -m benchmarks.sparsegpt_precision", argv),
        "",
        f"Machine: {machine()}. SparseGPT {a.pattern} of {a.model} on {calibration.n_tokens:,} calibration tokens; "
        f"llm-compressor's checkpoint: `{a.maintained}`. Perplexity: wikitext-2, {a.ppl_windows} windows of 512 tokens; "
        "ratios with a paired bootstrap over windows and the exact Wilcoxon signed-rank test.",
        "",
        "| block | linear | masks equal to llm-compressor's |",
        "|---|---|---|",
    ]
    lines += [f"| {b} | {name} | {agree:.2%} |" for b, name, agree in masks]
    lines += ["", "| model | perplexity [95% CI] |", "|---|---|"]
    lines += [
        f"| {name} | {fmt_value_ci(perplexity_rate(m))} |"
        for name, m in [
            ("toolkit, float64 Hessian (default)", float64),
            ("toolkit, float32 Hessian", float32),
            ("llm-compressor 0.14 (float32)", theirs),
        ]
    ]
    lines += ["", "| perplexity ratio | ratio [95% CI] | p (Wilcoxon, Holm over 3) |", "|---|---|---|"]
    lines += [
        f"| {name} | {r['ratio']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}] | {r['p_holm']:.2g} |"
        for (name, _, _), r in zip(pairs, tests)
    ]
    text = "\n".join(lines + [END])
    print(text)
    if a.write:
        from .__main__ import write_results

        write_results(Path(a.results), text, BEGIN, END)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())

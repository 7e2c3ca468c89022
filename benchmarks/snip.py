"""SNIP scores: one forward+backward per sample for all layers vs Wei et al.'s per-layer loop.

    python -m benchmarks.snip                      # embedded model, 4 calibration samples

Both compute the same scores up to float32 rounding (checked here and in tests/compression/test_snip.py);
the per-layer loop repeats the forward and backward pass once per decoder layer. Calibration pairs are fixed
(harmless instructions with a short fixed reply) so no generation time enters the comparison.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from compression.calibration import tokenize_pairs
from compression.snip import OnePassConfig, snip_scores_one_pass, snip_scores_per_layer
from lm import datasets
from lm.chat import format_prompts
from lm.errors import cli
from lm.loading import load_model

from .measure import measure
from .row import row
from .settings import Settings


def run(model_spec: str, n_samples: int) -> list[dict]:
    loaded = load_model(model_spec)
    instructions = datasets.sample(datasets.instructions("harmless", "train"), n_samples, 0)
    reply = "Here is a short, helpful answer to your question, with the key steps explained clearly."
    batches = tokenize_pairs(
        loaded.tokenizer, [(p, reply) for p in format_prompts(loaded.tokenizer, instructions)]
    ).batches
    device = next(loaded.model.parameters()).device
    rows, scores = [], {}
    for name, fn in (
        (f"one pass, all layers (dY^T X, packs of {OnePassConfig().batches_per_pass})", snip_scores_one_pass),
        ("per-layer loop (Wei et al.)", snip_scores_per_layer),
    ):
        m = measure(lambda fn=fn: fn(loaded.model, batches), device)
        scores[name], m.result = m.result, None
        rows.append(dict(implementation=name, seconds=m.seconds, measurement=m))
    a, b = scores.values()
    worst = max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp(min=1e-30)) for k in a)
    for r in rows:
        r["max_relative_difference"] = worst
    return rows


def rows(settings: Settings) -> list[dict]:
    fast, base = run(settings.model, settings.snip_samples)
    return [
        row(
            f"SNIP scores, {settings.snip_samples} calibration samples",
            base["implementation"],
            fast["implementation"],
            base["measurement"],
            fast["measurement"],
            check=f"max rel. diff {fast['max_relative_difference']:.1e}",
            note="Wei et al.'s loop: one forward + backward per layer and sample",
        )
    ]


@cli
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.snip", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="embedded")
    p.add_argument("--n-samples", type=int, default=4)
    a = p.parse_args(argv)
    rows = run(a.model, a.n_samples)
    base = rows[0]["seconds"]
    print(
        f"# SNIP scores, {a.model}, {a.n_samples} samples, {torch.get_num_threads()} threads, {time.strftime('%Y-%m-%d')}"
    )
    print(f"{'implementation':<30} {'seconds':>8} {'relative time':>13}")
    for r in rows:
        print(f"{r['implementation']:<30} {r['seconds']:>8.1f} {r['seconds'] / base:>12.1f}x")
    print(f"max relative score difference: {rows[0]['max_relative_difference']:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

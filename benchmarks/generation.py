"""Generation throughput at the ASR settings: one prompt at a time vs batched, measured side by side.

    python -m benchmarks.generation                      # embedded model, 32 AdvBench goals, 128 new tokens
    python -m benchmarks.generation --n-prompts 16 --max-new-tokens 256

Rows: transformers' `generate` one prompt at a time (batch 1), transformers' `generate` batched,
and the toolkit's compacting decode loop batched (finished rows leave the batch). Tokens/s
counts generated tokens up to and including each completion's end-of-turn token, so padding
after a finished row is not counted as work done. Absolute times on a shared CPU are noisy; the
ratios between rows of one run are the result.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time

import torch

from lm.chat import format_prompts
from lm.datasets import advbench_eval
from lm.errors import UserError
from lm.generation import SamplingConfig, generate, vllm_available
from lm.loading import load_model

from .measure import measure
from .suite import Settings, row


def _count_tokens(tokenizer, completions: list[list[str]]) -> int:
    # +1 for the end-of-turn token the decoder produced (or the last token at the limit).
    return sum(len(tokenizer(c[0], add_special_tokens=False)["input_ids"]) + 1 for c in completions)


def timed(model, tokenizer, prompts: list[str], backend: str, batch_size: int, max_new_tokens: int) -> dict:
    cfg = SamplingConfig(max_new_tokens=max_new_tokens, batch_size=batch_size, backend=backend)
    m = measure(lambda: generate(model, tokenizer, prompts, cfg, desc=f"{backend} bs={batch_size}"), next(model.parameters()).device)
    completions = m.result
    m.result = None
    tokens = _count_tokens(tokenizer, completions)
    return dict(backend=backend, batch_size=batch_size, seconds=m.seconds, tokens=tokens, tokens_per_s=tokens / m.seconds,
                completions=completions, measurement=m)


def run(model_spec: str, n_prompts: int, max_new_tokens: int, batch_size: int) -> list[dict]:
    loaded = load_model(model_spec)
    prompts = format_prompts(loaded.tokenizer, advbench_eval(n_prompts))
    backends = [("hf-generate", 1), ("hf-generate", batch_size), ("hf", batch_size)]
    if vllm_available():
        backends.append(("vllm", batch_size))
    rows = [timed(loaded.model, loaded.tokenizer, prompts, backend, bs, max_new_tokens) for backend, bs in backends]
    reference = rows[0]["completions"]
    for r in rows:
        r["same_as_one_at_a_time"] = sum(a == b for a, b in zip(r.pop("completions"), reference)) / len(reference)
    return rows


NAMES = {"hf-generate": "transformers generate", "hf": "compacting decode (default)", "vllm": "vLLM"}


def rows(settings: Settings) -> list[dict]:
    """Suite rows: each batched implementation against one-prompt-at-a-time `generate`."""
    measured = run(settings.model, settings.gen_prompts, settings.gen_new_tokens, settings.gen_batch)
    base = measured[0]
    out = []
    for r in measured[1:]:
        out.append(row(
            f"generation, {settings.gen_prompts} AdvBench goals, greedy <= {settings.gen_new_tokens} new tokens (tokens/s)",
            f"{NAMES[base['backend']]}, batch 1", f"{NAMES[r['backend']]}, batch {r['batch_size']}",
            base["measurement"], r["measurement"],
            check=f"{r['same_as_one_at_a_time']:.0%} same text",
            note=f"{base['tokens_per_s']:.1f} vs {r['tokens_per_s']:.1f} tokens/s ({r['tokens']} tokens)",
            work=r["tokens"] / base["tokens"],
        ))
    return out


def print_table(rows: list[dict], header: str) -> None:
    base = rows[0]["tokens_per_s"]
    print(header)
    print(f"{'implementation':<34} {'batch':>5} {'seconds':>8} {'tokens':>7} {'tokens/s':>9} {'speed-up':>8} {'same text':>9}")
    for r in rows:
        print(f"{NAMES[r['backend']]:<34} {r['batch_size']:>5} {r['seconds']:>8.1f} {r['tokens']:>7} "
              f"{r['tokens_per_s']:>9.1f} {r['tokens_per_s'] / base:>7.1f}x {r['same_as_one_at_a_time']:>9.0%}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.generation", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="embedded")
    p.add_argument("--n-prompts", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    a = p.parse_args(argv)
    try:
        rows = run(a.model, a.n_prompts, a.max_new_tokens, a.batch_size)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print_table(rows, f"# generation, {a.model}: {a.n_prompts} AdvBench goals, greedy, <= {a.max_new_tokens} new tokens; "
                      f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, {time.strftime('%Y-%m-%d')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

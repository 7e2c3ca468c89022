"""The benchmark suite: sizes, the rows it measures, and the worker process that measures them.

Each group of rows (generation, SNIP, pruning, direction extraction, selection scoring) runs in
its own Python process (`python -m benchmarks.suite GROUP SETTINGS_JSON OUT_JSON`), so the peak
memory of one group never carries into another and every group starts from a freshly loaded
model. Inside a group, baseline and fast implementation run one after the other on the same
inputs, and their results are compared there.

A row is a dict: comparison, baseline / fast (implementation names), baseline_s / fast_s (wall
clock) and baseline_cpu_s / fast_cpu_s (CPU time), speedup / cpu_speedup (baseline time / fast
time by either clock; for generation a tokens/s ratio), baseline_mib / fast_mib (peak extra
memory, see benchmarks.measure), check (do the results agree) and note.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch

from lm.cache import atomic_write_json
from lm.errors import UserError, cli


@dataclass(frozen=True)
class Settings:
    model: str = "embedded"  # the main model: 'embedded', a hub id, a local directory or a .gguf file
    #: A second, smaller model for "pruning time and memory vs model size": "scaled" builds a
    #: seeded random model of the main model's architecture and tokenizer, 4 layers of width 128.
    small_model: str = "scaled"
    #: AdvBench goals generated: more than the batch rows, as in an ASR run (100-520 goals, batches
    #: of up to 64), so the decoder's continuous batching has prompts to admit as refusals finish.
    gen_prompts: int = 64
    gen_new_tokens: int = 128  # new tokens per goal (the ASR setting is 256: --size full)
    gen_batch: int = 32  # goals per batch
    gen_baseline_every: int = 4  # one-prompt-at-a-time decodes every k-th goal: a rate, and the slow row
    snip_samples: int = 4  # SNIP (prompt, response) samples
    direction_prompts: int = 128  # harmful and harmless instructions each for direction extraction
    direction_batch: int = 16  # prompts per extraction pass (candidate_directions' default)
    #: held-out harmful and harmless instructions each for the probes row (train: direction_prompts)
    probe_test: int = 50
    prune_samples: int = 16  # calibration instructions for pruning (the variants use 128)
    select_candidates: int = 8  # (position -1, layer) candidates scored both ways
    select_val: int = 8  # harmful and harmless validation instructions each for selection
    threads: int = 0  # torch intra-op threads in the workers; 0 leaves torch's default

    def __post_init__(self):
        counts = [getattr(self, f.name) for f in fields(self) if f.type in ("int", int) and f.name != "threads"]
        if min(counts) <= 0:
            raise UserError("benchmark sizes must be positive")
        if self.threads < 0:
            raise UserError("--threads must be >= 0")


SIZES = {
    "default": Settings(),
    # The ASR settings: 256 new tokens, the main job's 100 goals; 128 calibration samples.
    "full": Settings(
        gen_prompts=100,
        gen_new_tokens=256,
        gen_batch=64,
        snip_samples=16,
        prune_samples=128,
        select_candidates=24,
        select_val=32,
    ),
    # Seconds on tiny models: what the tests run.
    "tiny": Settings(
        gen_prompts=3,
        gen_new_tokens=6,
        gen_batch=3,
        gen_baseline_every=1,
        snip_samples=2,
        direction_prompts=4,
        direction_batch=2,
        probe_test=2,
        prune_samples=4,
        select_candidates=3,
        select_val=2,
    ),
}

GROUPS = ("generation", "snip", "pruning", "direction", "selection", "probes")


def settings_for(size: str, **overrides) -> Settings:
    if size not in SIZES:
        raise UserError(f"unknown size {size!r}; choose one of {', '.join(SIZES)}")
    return replace(SIZES[size], **{k: v for k, v in overrides.items() if v is not None})


def run_group(group: str, settings: Settings) -> list[dict]:
    """The rows of one group, measured in this process."""
    if settings.threads:
        torch.set_num_threads(settings.threads)
    if group == "generation":
        from .generation import rows
    elif group == "snip":
        from .snip import rows
    elif group == "pruning":
        from .pruning import rows
    elif group == "direction":
        from .direction import rows
    elif group == "selection":
        from .selection import rows
    elif group == "probes":
        from .probes import rows
    else:
        raise UserError(f"unknown benchmark group {group!r}; choose from {', '.join(GROUPS)}")
    return rows(settings)


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


@cli
def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 3:
        print("usage: python -m benchmarks.suite GROUP SETTINGS_JSON OUT_JSON", file=sys.stderr)
        return 2
    group, settings_json, out = argv
    settings = Settings(**json.loads(settings_json))
    rows = run_group(group, settings)
    atomic_write_json(Path(out), dict(group=group, settings=asdict(settings), rows=rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

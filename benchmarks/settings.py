"""The benchmark suite's sizes: how much work each group of rows does (`Settings`), by name."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from lm.errors import UserError


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


def settings_for(size: str, **overrides) -> Settings:
    if size not in SIZES:
        raise UserError(f"unknown size {size!r}; choose one of {', '.join(SIZES)}")
    return replace(SIZES[size], **{k: v for k, v in overrides.items() if v is not None})

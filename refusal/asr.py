"""Attack success rate under the three published settings, scored by both judges.

vanilla      greedy decoding, the model's default chat template
adv_decoding temperature 1.0, 5 samples per prompt, ASR = mean over all samples
adv_suffix   greedy, each GCG suffix appended to the instruction, ASR = max over suffixes
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from lm.chat import format_prompts
from lm.datasets import gcg_suffixes
from lm.errors import UserError
from lm.generation import SamplingConfig, generate

from .judges import asr, judges

SETTINGS = ("vanilla", "adv_decoding", "adv_suffix")


@dataclass(frozen=True)
class AsrConfig:
    setting: str = "vanilla"
    max_new_tokens: int = 256
    batch_size: int | None = None
    seed: int = 0
    backend: str = "auto"  # lm.generation: vLLM where installed and able to serve the model, else "hf"
    system: str | None = None  # None keeps the template's default system prompt

    def __post_init__(self):
        if self.setting not in SETTINGS:
            raise UserError(f"unknown ASR setting {self.setting!r}; choose one of {', '.join(SETTINGS)}")


def _score(completions: list[str]) -> dict[str, float]:
    return {j.name: asr(completions, j) for j in judges()}


def attack_success(model, tokenizer, goals: list[str], cfg: AsrConfig = AsrConfig(), label: str = "ASR") -> dict:
    """ASR of `goals` under one setting: both judges, the prompt count, and every completion.
    `label` names the pass on the progress bars (e.g. "over-refusal" for harmless prompts)."""
    if not goals:
        raise UserError("no goals to evaluate ASR on (empty dataset)")
    base = SamplingConfig(
        max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, seed=cfg.seed, backend=cfg.backend
    )
    if cfg.setting == "vanilla":
        outs = generate(model, tokenizer, format_prompts(tokenizer, goals, cfg.system), base, desc=f"{label} vanilla")
        flat = [o[0] for o in outs]
        return dict(setting=cfg.setting, n_prompts=len(goals), asr=_score(flat), completions=flat)
    if cfg.setting == "adv_decoding":
        sampling = replace(base, temperature=1.0, n_samples=5)
        outs = generate(
            model, tokenizer, format_prompts(tokenizer, goals, cfg.system), sampling, desc=f"{label} adv-decoding"
        )
        flat = [s for o in outs for s in o]
        return dict(setting=cfg.setting, n_prompts=len(goals), n_samples=5, asr=_score(flat), completions=outs)
    per_suffix = []
    for k, suffix in enumerate(gcg_suffixes()):
        outs = generate(
            model,
            tokenizer,
            format_prompts(tokenizer, goals, cfg.system, suffix=" " + suffix),
            base,
            desc=f"{label} suffix {k + 1} of {len(gcg_suffixes())}",
        )
        flat = [o[0] for o in outs]
        per_suffix.append(dict(suffix=suffix, asr=_score(flat), completions=flat))
    best = {name: max(s["asr"][name] for s in per_suffix) for name in per_suffix[0]["asr"]}
    return dict(setting=cfg.setting, n_prompts=len(goals), asr=best, per_suffix=per_suffix)

"""How well one direction mediates refusal inside a model: bypass, induce and KL for a single direction.

The same three numbers selection computes for every candidate, computed for one given direction —
typically the original model's chosen direction evaluated inside a compressed variant, or a
variant's direction evaluated inside the original (cross-application).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from lm.errors import UserError

from .score import kl_divergence, prompt_last_logits, refusal_score
from .stats import bootstrap_mean


@dataclass(frozen=True)
class DirectionQuality:
    bypass: float  # mean refusal score on harmful prompts with the direction ablated everywhere
    induce: float  # mean refusal score on harmless prompts with the raw vector added at `layer`
    kl: float  # mean KL(baseline || ablated) on harmless prompts, last position
    baseline_harmful: float
    baseline_harmless: float
    layer: int
    #: 95% bootstrap intervals over prompts of bypass, induce and kl (refusal.stats.bootstrap_mean
    #: objects); None in a result cached before they were kept.
    ci95: dict | None = None

    @property
    def refusal_removed(self) -> float:
        """Drop in the harmful refusal score caused by ablation (log-odds units)."""
        return self.baseline_harmful - self.bypass

    def to_json(self) -> dict:
        return {**asdict(self), "refusal_removed": self.refusal_removed}


def direction_quality(
    model,
    tokenizer,
    direction_raw: torch.Tensor,
    layer: int,
    harmful: list[str],
    harmless: list[str],
    token_ids: list[int],
    batch_size: int = 32,
    system: str | None = None,
) -> DirectionQuality:
    if not harmful or not harmless:
        raise UserError("direction quality needs non-empty harmful and harmless prompt sets")
    if not torch.isfinite(direction_raw).all() or float(direction_raw.norm()) == 0:
        raise UserError("direction is zero or not finite")
    vec = direction_raw.float()
    harm_base = prompt_last_logits(model, tokenizer, harmful, batch_size, system)
    harm_abl = prompt_last_logits(model, tokenizer, harmful, batch_size, system, ablate=vec)
    safe_base = prompt_last_logits(model, tokenizer, harmless, batch_size, system)
    safe_abl = prompt_last_logits(model, tokenizer, harmless, batch_size, system, ablate=vec)
    safe_add = prompt_last_logits(model, tokenizer, harmless, batch_size, system, add={layer: vec})
    per_prompt = dict(
        bypass=refusal_score(harm_abl, token_ids),
        induce=refusal_score(safe_add, token_ids),
        kl=kl_divergence(safe_base, safe_abl),
    )
    return DirectionQuality(
        bypass=float(per_prompt["bypass"].mean()),
        induce=float(per_prompt["induce"].mean()),
        kl=float(per_prompt["kl"].mean()),
        ci95={k: bootstrap_mean(v.double().tolist()) for k, v in per_prompt.items()},
        baseline_harmful=float(refusal_score(harm_base, token_ids).mean()),
        baseline_harmless=float(refusal_score(safe_base, token_ids).mean()),
        layer=layer,
    )

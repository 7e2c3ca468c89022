"""Candidate scoring for direction selection: batched passes vs one candidate at a time.

Arditi et al. score each (position, layer) candidate with its own forward passes: bypass (harmful
val, direction ablated), KL (harmless val, ablated, against the unablated logits) and induce
(harmless val, direction added at its layer). refusal.candidate_scores.score_candidates puts several
candidates into one pass (each row carries its own direction) and resumes induce passes from
cached block inputs. Both run here on the same candidates (position -1, layers spread over the
model) and validation prompts; the scores must agree up to float rounding.
"""

from __future__ import annotations

import math

import torch

from lm import datasets
from lm.hooks import decoder_layers
from lm.loading import load_model
from refusal.candidate_scores import score_candidates
from refusal.direction import candidate_directions
from refusal.score import (
    kl_divergence,
    prompt_last_logits,
    refusal_score,
    refusal_tokens,
)

from .measure import measure
from .row import row
from .settings import Settings

TRAIN = 16  # harmful and harmless instructions for the candidate directions (not timed)


def candidate_layers(n_layers: int, k: int) -> list[int]:
    """k layers spread over 1..n_layers-1 (layer 0's difference is zero: every template token
    embeds the same in both sets)."""
    k = min(k, n_layers - 1)
    return sorted({1 + round(i * (n_layers - 2) / max(1, k - 1)) for i in range(k)})


@torch.no_grad()
def one_at_a_time(model, tokenizer, directions, layers, harmful_val, harmless_val, token_ids, batch_size) -> dict:
    """Arditi et al.'s loop over candidates at position -1: three scores, separate passes each."""
    base = prompt_last_logits(model, tokenizer, harmless_val, batch_size)
    bypass, kl, induce = {}, {}, {}
    for layer in layers:
        d = directions[-1, layer]
        bypass[layer] = float(
            refusal_score(prompt_last_logits(model, tokenizer, harmful_val, batch_size, ablate=d), token_ids).mean()
        )
        kl[layer] = float(
            kl_divergence(base, prompt_last_logits(model, tokenizer, harmless_val, batch_size, ablate=d)).mean()
        )
        induce[layer] = float(
            refusal_score(
                prompt_last_logits(model, tokenizer, harmless_val, batch_size, add={layer: d}), token_ids
            ).mean()
        )
    per_h, per_s = math.ceil(len(harmful_val) / batch_size), math.ceil(len(harmless_val) / batch_size)
    return dict(bypass=bypass, kl=kl, induce=induce, passes=per_s + len(layers) * (per_h + 2 * per_s))


def rows(settings: Settings) -> list[dict]:
    loaded = load_model(settings.model)
    model, tok = loaded.model, loaded.tokenizer
    token_ids = refusal_tokens(tok)
    train_h = datasets.sample(datasets.instructions("harmful", "train"), TRAIN, 0)
    train_s = datasets.sample(datasets.instructions("harmless", "train"), TRAIN, 0)
    harmful_val = datasets.sample(datasets.instructions("harmful", "val"), settings.select_val, 0)
    harmless_val = datasets.sample(datasets.instructions("harmless", "val"), settings.select_val, 0)
    directions = candidate_directions(model, tok, train_h, train_s)["directions"]
    n_layers = len(decoder_layers(model))
    layers = candidate_layers(n_layers, settings.select_candidates)
    n_pos = directions.shape[0]
    subset = [(n_pos - 1) * n_layers + layer for layer in layers]
    device = next(model.parameters()).device

    loop = measure(
        lambda: one_at_a_time(model, tok, directions, layers, harmful_val, harmless_val, token_ids, 32), device
    )
    batched = measure(
        lambda: score_candidates(model, tok, directions, harmful_val, harmless_val, token_ids, subset=subset), device
    )
    scores = batched.result
    diff = max(
        abs(float(getattr(scores, name)[-1, layer]) - loop.result[name][layer])
        for name in ("bypass", "kl", "induce")
        for layer in layers
    )
    passes = scores.passes
    fast_passes = passes.get("baseline", 0) + passes["scoring_passes"]
    return [
        row(
            f"selection scoring, {len(layers)} candidates x {settings.select_val}+{settings.select_val} val prompts",
            f"one candidate at a time ({loop.result['passes']} passes)",
            f"batched candidates, resumed induce ({fast_passes} passes)",
            loop,
            batched,
            check=f"max abs score diff {diff:.1e}",
            note=f"{loop.result['passes'] / fast_passes:.0f}x fewer forward passes; induce runs "
            f"{passes['induce_block_fraction']:.0%} of the blocks",
        )
    ]

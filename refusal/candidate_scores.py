"""Arditi et al.'s three selection scores of every candidate direction, several candidates per
forward pass (refusal.select chooses among them).

bypass  mean refusal score on harmful val with the direction ablated everywhere;
induce  mean refusal score on harmless val with the raw vector added at its own layer;
kl      KL(baseline || ablated) of the next-token distribution on harmless val.

The prompt batch is repeated once per candidate and each row carries its own direction (per-row
hooks in lm.hooks.intervene); induce passes resume from a cached baseline block input (lm.partial_forward)
instead of recomputing the unchanged prefix.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from lm.chat import format_prompts, tokenize_prompts
from lm.errors import UserError
from lm.hooks import decoder_layers, intervene
from lm.partial_forward import block_kwargs, last_logits, layer_inputs, run_from_layer, uniform_layers

from .score import kl_divergence, refusal_score


@dataclass
class CandidateScores:
    bypass: torch.Tensor  # [n_positions, n_layers] float64
    induce: torch.Tensor
    kl: torch.Tensor
    baseline_harmful: float  # mean refusal score without intervention
    baseline_harmless: float
    passes: dict
    evaluated: torch.Tensor | None = None  # [n_pos, n_layers] bool: all three scores computed


def bypass_score(ablated_logits: torch.Tensor, token_ids: list[int]) -> torch.Tensor:
    """Per harmful prompt: the refusal score with the direction ablated everywhere (low: ablating it stops refusal)."""
    return refusal_score(ablated_logits, token_ids)


def induce_score(added_logits: torch.Tensor, token_ids: list[int]) -> torch.Tensor:
    """Per harmless prompt: the refusal score with the raw vector added at its layer (high: adding it causes refusal)."""
    return refusal_score(added_logits, token_ids)


def kl_score(baseline_logits: torch.Tensor, ablated_logits: torch.Tensor) -> torch.Tensor:
    """Per harmless prompt: KL(baseline || ablated) at the last position (low: ablation leaves harmless replies alone)."""
    return kl_divergence(baseline_logits, ablated_logits)


def chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def batch_plan(n_prompts: int, max_rows: int) -> tuple[int, int]:
    """(prompts per pass, candidates per pass): all prompts in a pass if they fit, else chunks."""
    chunk = min(n_prompts, max_rows)
    return chunk, max(1, max_rows // chunk)


def _encode(tokenizer, insts: list[str], chunk: int, system: str | None, device) -> list[dict]:
    prompts = format_prompts(tokenizer, insts, system)
    return [tokenize_prompts(tokenizer, part).to(device) for part in chunks(prompts, chunk)]


def _repeated(enc, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    # Candidate-major rows: row g * P + p is prompt p under the g-th candidate of the group.
    return enc["input_ids"].repeat(k, 1), enc["attention_mask"].repeat(k, 1)


@torch.no_grad()
def _ablated_means(model, batches, flat, candidates, k, per_row, n_prompts, passes, stage) -> torch.Tensor:
    """Mean over prompts of per_row(logits under each candidate's ablation); NaN for others."""
    sums = torch.full((flat.shape[0],), float("nan"), dtype=torch.float64)
    sums[candidates] = 0.0
    for bi, enc in enumerate(batches):
        p = enc["input_ids"].shape[0]
        for group in tqdm(chunks(candidates, k), desc=stage, unit="pass", leave=False):
            ids, mask = _repeated(enc, len(group))
            with intervene(model, ablate=flat[group].repeat_interleave(p, dim=0)):
                logits = last_logits(model, ids, mask)
            sums[group] += per_row(logits, bi, len(group)).view(len(group), p).sum(dim=1).cpu()
            passes[stage] += 1
    return sums / n_prompts


@torch.no_grad()
def score_candidates(
    model,
    tokenizer,
    directions: torch.Tensor,
    harmful_val: list[str],
    harmless_val: list[str],
    token_ids: list[int],
    max_rows: int = 256,
    system: str | None = None,
    reuse_prefix: bool | None = None,
    subset: list[int] | None = None,
    which: tuple[str, ...] = ("bypass", "kl", "induce"),
) -> CandidateScores:
    """Mean bypass_score, induce_score and kl_score of every candidate in `directions` [n_pos, n_layers, d].

    reuse_prefix: resume induce passes from cached baseline block inputs (default: whenever the
    model's blocks share their keyword arguments, see lm.partial_forward.uniform_layers).
    subset / which: score only these flat candidate indices (position_index * n_layers + layer)
    and only these scores; everything else is NaN.
    """
    if not harmful_val or (not harmless_val and ("kl" in which or "induce" in which)):
        raise UserError("candidate scoring needs non-empty harmful and harmless validation sets")
    n_pos, n_layers, d = directions.shape
    if n_layers != len(decoder_layers(model)):
        raise UserError(f"directions have {n_layers} layers, the model {len(decoder_layers(model))}")
    if reuse_prefix is None:
        reuse_prefix = uniform_layers(model)
    device = next(model.parameters()).device
    # Candidate c = position_index * n_layers + layer. Raw vectors throughout: the ablation hooks
    # normalise them, exactly as a one-candidate run would.
    flat = directions.reshape(-1, d).float().to(device)
    n_cand = flat.shape[0]
    layer_of = [c % n_layers for c in range(n_cand)]
    norms = flat.norm(dim=-1)
    # A zero difference (e.g. layer 0, where every post-instruction token embeds identically) has
    # no direction; Arditi et al.'s normalisation gives NaN scores there, which the filter rejects.
    wanted = set(range(n_cand) if subset is None else subset)
    ablatable = [c for c in range(n_cand) if c in wanted and norms[c] > 0 and torch.isfinite(norms[c])]
    passes: Counter = Counter()

    chunk_h, k_h = batch_plan(len(harmful_val), max_rows)
    chunk_s, k_s = batch_plan(max(1, len(harmless_val)), max_rows)
    harmful = _encode(tokenizer, harmful_val, chunk_h, system, device) if "bypass" in which else []
    harmless = _encode(tokenizer, harmless_val, chunk_s, system, device) if ("kl" in which or "induce" in which) else []

    base_logits, prefix = [], []
    base_harmful = base_harmless = 0.0
    for enc in harmful:
        base_harmful += float(
            refusal_score(last_logits(model, enc["input_ids"], enc["attention_mask"]), token_ids).sum()
        )
        passes["baseline"] += 1
    for enc in harmless:
        inputs, logits = layer_inputs(model, enc["input_ids"], enc["attention_mask"])
        base_logits.append(logits)
        prefix.append(inputs if reuse_prefix else None)
        base_harmless += float(refusal_score(logits, token_ids).sum())
        passes["baseline"] += 1

    nothing = torch.full((n_cand,), float("nan"), dtype=torch.float64)
    bypass = (
        _ablated_means(
            model,
            harmful,
            flat,
            ablatable,
            k_h,
            lambda logits, bi, k: bypass_score(logits, token_ids),
            len(harmful_val),
            passes,
            "bypass",
        )
        if "bypass" in which
        else nothing.clone()
    )
    kl = (
        _ablated_means(
            model,
            harmless,
            flat,
            ablatable,
            k_s,
            lambda logits, bi, k: kl_score(base_logits[bi].repeat(k, 1), logits),
            len(harmless_val),
            passes,
            "kl",
        )
        if "kl" in which
        else nothing.clone()
    )

    # Grouping candidates by layer keeps each group's earliest layer, where resuming starts, late.
    order = sorted(wanted, key=lambda c: (layer_of[c], c)) if "induce" in which else []
    induce = nothing.clone()
    induce[order] = 0.0
    blocks_run = 0
    for bi, enc in enumerate(harmless):
        p = enc["input_ids"].shape[0]
        kwargs_by_size: dict[int, dict] = {}
        for group in tqdm(chunks(order, k_s), desc="induce", unit="pass", leave=False):
            ids, mask = _repeated(enc, len(group))
            adds: dict[int, torch.Tensor] = {}
            for g, c in enumerate(group):
                rows = adds.setdefault(layer_of[c], torch.zeros(len(group) * p, d, device=device))
                rows[g * p : (g + 1) * p] = flat[c]  # rows of other candidates stay zero: unchanged
            start = min(layer_of[c] for c in group)
            if reuse_prefix:
                if len(group) not in kwargs_by_size:
                    kwargs_by_size[len(group)] = block_kwargs(model, ids, mask)
                hidden = prefix[bi][start].repeat(len(group), 1, 1)
                with intervene(model, add=adds):
                    logits = run_from_layer(model, hidden, kwargs_by_size[len(group)], start)
                blocks_run += n_layers - start
            else:
                with intervene(model, add=adds):
                    logits = last_logits(model, ids, mask)
                blocks_run += n_layers
            induce[group] += induce_score(logits, token_ids).view(len(group), p).sum(dim=1).cpu()
            passes["induce"] += 1
    induce /= max(1, len(harmless_val))

    shape = (n_pos, n_layers)
    # The same scores one candidate per pass: a pass per candidate and prompt batch, per score.
    one_at_a_time = (
        len(ablatable) * len(harmful)
        + (len(ablatable) if "kl" in which else 0) * len(harmless)
        + len(order) * len(harmless)
    )
    passes = dict(passes)
    passes.update(
        candidates=n_cand,
        candidates_per_pass=dict(harmful=min(k_h, n_cand), harmless=min(k_s, n_cand)),
        scoring_passes=passes.get("bypass", 0) + passes.get("kl", 0) + passes.get("induce", 0),
        scoring_passes_one_at_a_time=one_at_a_time,
        induce_block_fraction=blocks_run / max(1, passes.get("induce", 0) * n_layers),
        resumed_induce=bool(reuse_prefix),
    )
    return CandidateScores(
        bypass=bypass.view(shape),
        induce=induce.view(shape),
        kl=kl.view(shape),
        baseline_harmful=base_harmful / len(harmful_val) if harmful else float("nan"),
        baseline_harmless=base_harmless / len(harmless_val) if harmless else float("nan"),
        passes=dict(passes),
    )

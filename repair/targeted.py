"""Targeted restoration: bring back only the compressed-away weights that matter for refusal.

AIRD's cost is a whole block losing its compression. Here each changed weight w (original value
w_o, compressed value w_c) in the blocks before the source layer l (the blocks that write the
refusal direction) is scored by the first-order change that restoring it makes to an objective J
measured on harmful prompts in the compressed model:

    score(w) = (w_o - w_c) * dJ/dw

and the highest positive scores are restored, best first, until the refusal rate on harmful
validation prompts (greedy replies, Arditi et al.'s judge) reaches AIRD's. Three objectives:

  own_refusals  J = log-likelihood of the original model's own greedy refusals to harmful training
                prompts (teacher forcing, reply tokens only): restore what makes the model say
                what it used to say. Default.
  refusal       J = mean refusal score (log-odds of a refusal opening) at the last prompt
                position. Cheap, but a few dozen weights raise it ("I'm sorry to have a problem...")
                without the model refusing more: on the embedded model's set-difference variant,
                29 weights matched AIRD's score with the ASR unchanged.
  projection    J = mean projection of the residual stream at the source (position p, layer l) onto
              the original's unit direction r, signed to grow towards the original's projection.
              For a matrix that writes the residual stream (attention output, MLP down
              projection) dJ/dW_ij = r_i * sum_t x_j(t), so the score is the write-side
              contribution (w_o - w_c)_ij r_i x_j; for matrices that read it (q/k/v, gate/up) the
              gradient carries the effect through attention and the MLP. On the embedded model
              this restores the projection quickly but barely moves the refusal score and then
              overshoots (the projection passes the original's and KL grows), which is why it is
              not the default.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from lm.chat import format_prompts, tokenize_prompts
from lm.errors import UserError
from lm.hooks import decoder_layers
from lm.partial_forward import input_of_block
from lm.trainable import gradients_only_for
from refusal.score import refusal_score

from .restore import block_params, count, restored

OBJECTIVES = ("own_refusals", "refusal", "projection")


@dataclass(frozen=True)
class TargetedConfig:
    #: Budgets tried, as fractions of AIRD's restored count, smallest first; the first whose harmful
    #: refusal rate reaches AIRD's is refined by bisection.
    fractions: tuple[float, ...] = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
    #: bisection steps between the last budget short of AIRD's refusal rate and the first reaching it
    bisect_steps: int = 3
    batch_size: int = 8  # prompts per attribution pass
    #: What the attribution scores measure: the likelihood of the original's own refusals
    #: (own_refusals), the first-token refusal score (refusal), or the projection onto the direction
    #: at its source (projection); see the module docstring.
    objective: Literal["own_refusals", "refusal", "projection"] = "own_refusals"
    reply_tokens: int = 32  # length of the original's own refusals (own_refusals) and of the judged replies

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise UserError(f"unknown targeted objective {self.objective!r}; choose one of {', '.join(OBJECTIVES)}")


def changed_params(compressed: nn.Module, original: nn.Module, layer: int) -> dict[str, nn.Parameter]:
    """Parameters of blocks 0..layer-1 where the compressed model differs from the original."""
    o_params = dict(original.named_parameters())
    params = {
        n: p
        for c in range(layer)
        for n, p in block_params(compressed, c).items()
        if not torch.equal(p.detach(), o_params[n].detach().to(p.device, p.dtype))
    }
    if not params:
        raise UserError(
            "the compressed model equals the original in every block before the source layer; nothing to restore"
        )
    return params


def first_order_scores(
    compressed: nn.Module, original: nn.Module, layer: int, batches: list, objective: Callable
) -> dict[str, torch.Tensor]:
    """(w_o - w_c) * dJ/dw for every changed entry before `layer`, J = sum of objective(model, batch) over batches.

    Scores are float32 on CPU; the gradient is accumulated over batches, so memory is one float32
    copy of the scored parameters whatever the number of prompts.
    """
    params = changed_params(compressed, original, layer)
    o_params = dict(original.named_parameters())
    grads = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    with gradients_only_for(compressed, list(params.values())):
        for batch in tqdm(batches, desc="targeted attribution", unit="batch", leave=False):
            j = objective(compressed, batch)
            for n, g in zip(params, torch.autograd.grad(j, list(params.values()))):
                grads[n] += g.float()
    return {
        n: ((o_params[n].detach().to(p.device, torch.float32) - p.detach().float()) * grads[n]).cpu()
        for n, p in params.items()
    }


def prompt_batches(
    tokenizer, instructions: list[str], batch_size: int, device, system: str | None = None
) -> list[dict]:
    if not instructions:
        raise UserError("targeted repair needs harmful prompts to attribute refusal on")
    prompts = format_prompts(tokenizer, instructions, system)
    return [
        dict(tokenize_prompts(tokenizer, prompts[i : i + batch_size]).to(device), n=len(prompts))
        for i in range(0, len(prompts), batch_size)
    ]


def refusal_objective(token_ids: list[int]) -> Callable:
    """Mean refusal log-odds at the last prompt position."""

    def objective(model, batch):
        logits = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False, logits_to_keep=1
        ).logits[:, -1]
        return refusal_score(logits, token_ids).sum() / batch["n"]

    return objective


def projection_objective(direction: torch.Tensor, source: tuple[int, int], sign: float = 1.0) -> Callable:
    """Mean signed projection of the source residual onto the unit direction; the pass stops at the source."""
    position, layer = source
    unit = direction.float() / direction.float().norm()

    def objective(model, batch):
        hidden = input_of_block(model, layer, batch["input_ids"], batch["attention_mask"])[0][:, position]
        return sign * (hidden.float() @ unit.to(hidden.device)).sum() / batch["n"]

    return objective


def own_refusal_objective(n_tokens: int) -> Callable:
    """Mean log-likelihood of the original's own refusal replies (teacher forcing, reply tokens only)."""

    def objective(model, batch):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits[
            :, :-1
        ]
        labels = batch["labels"][:, 1:]
        logp = torch.log_softmax(logits.float(), dim=-1)
        keep = labels != -100
        picked = logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        return (picked * keep).sum() / n_tokens

    return objective


def own_refusal_batches(
    original: nn.Module, tokenizer, instructions: list[str], batch_size: int, max_new_tokens: int = 32, seed: int = 0
) -> tuple[list[dict], int]:
    """The original's greedy replies to `instructions`, refusals only, as teacher-forcing batches; and the reply-token count."""
    from compression.attribution import is_refusal, own_replies
    from compression.calibration import tokenize_pairs

    pairs = [(p, r) for p, r in own_replies(original, tokenizer, instructions, max_new_tokens, seed) if is_refusal(r)]
    if not pairs:
        raise UserError("the original refuses none of the harmful prompts; there is no refusal to attribute")
    cal = tokenize_pairs(tokenizer, pairs, seqlen=256, batch_size=batch_size)
    device = next(original.parameters()).device
    return [{k: v.to(device) for k, v in b.items()} for b in cal.batches], cal.n_response_tokens


def top_masks(scores: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Masks of the k highest positive scores over all parameters (exact ties at the cut all kept)."""
    empty = {n: torch.zeros_like(s, dtype=torch.bool) for n, s in scores.items()}
    if k <= 0:
        return empty
    # Per-parameter top-k first keeps memory at k per matrix instead of one model-sized vector;
    # unsorted selection, since only the k-th largest value overall is needed.
    parts = []
    for s in scores.values():
        flat = s.flatten()
        positive = flat[flat > 0]
        parts.append(positive.topk(k, sorted=False).values if positive.numel() > k else positive)
    candidates = torch.cat(parts)
    if candidates.numel() == 0:
        return empty
    threshold = candidates.kthvalue(candidates.numel() - k + 1).values if candidates.numel() > k else candidates.min()
    return {n: (s >= threshold) & (s > 0) for n, s in scores.items()}


def positive_count(scores: dict[str, torch.Tensor]) -> int:
    return int(sum(int((s > 0).sum()) for s in scores.values()))


def first_layer_touched(masks: dict[str, torch.Tensor], layer_of: dict[str, int]) -> int:
    touched = [layer_of[n] for n, m in masks.items() if bool(m.any())]
    return min(touched) if touched else 0


def search_budget(
    compressed: nn.Module,
    original: nn.Module,
    probe,
    scores: dict[str, torch.Tensor],
    aird_count: int,
    target: float,
    cfg: TargetedConfig = TargetedConfig(),
) -> dict:
    """Smallest restoration (in cfg.fractions of AIRD's count, then bisection) whose harmful refusal
    rate (greedy replies judged, `probe.refusal_rate`) reaches `target`, AIRD's rate."""
    layer_of = {n: c for c in range(len(decoder_layers(compressed))) for n in block_params(compressed, c)}
    max_k = positive_count(scores)
    trials = []

    def trial(k: int) -> bool:
        masks = top_masks(scores, k)
        with restored(compressed, original, masks):
            reading = probe.read(first_layer_touched(masks, layer_of))
            rate = probe.refusal_rate(cfg.reply_tokens)
        trials.append(
            dict(k=count(masks), fraction_of_aird=count(masks) / aird_count, refusal_rate=rate, **reading.to_json())
        )
        return rate >= target

    lo, hi = 0, None
    for fraction in cfg.fractions:
        k = min(max(1, round(fraction * aird_count)), max_k)
        if k <= lo:
            continue
        if trial(k):
            hi = k
            break
        lo = k
        if k == max_k:
            break
    for _ in range(cfg.bisect_steps if hi is not None else 0):
        mid = (lo + hi) // 2
        if not lo < mid < hi:
            break
        if trial(mid):
            hi = mid
        else:
            lo = mid
    return dict(
        target_refusal_rate=target,
        reached=hi is not None,
        k=hi,
        positive_scores=max_k,
        trials=sorted(trials, key=lambda t: t["k"]),
    )

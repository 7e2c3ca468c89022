"""SNIP importance (Lee et al. 2019) as Wei et al. (2024) use it to attribute behaviour to weights.

    score(W) = sum over calibration batches b of |W * dL_b/dW|

L_b is the mean next-token cross-entropy over the response tokens of batch b (prompt and padding
are labelled -100). The absolute value is taken per batch before summing; with one sample per
batch (the default of ResponseCalibrationConfig) that is Wei et al.'s per-example accumulation.
Bigger batches take |.| of a batch-mean gradient, where gradients of different samples can cancel:
cheaper, but a different score.

Only decoder linear weights get gradients (embeddings, norms and the LM head are frozen for the
duration), and scores are kept as float32 on the CPU, so device memory holds one set of gradients.

Two ways to get the same scores:
  snip_scores_one_pass    one forward + backward per batch yields every layer's gradient;
  snip_scores_per_layer   Wei et al.'s loop: per decoder layer, a forward + backward in which only
                          that layer requires grad (autograd then keeps no graph for earlier
                          layers). L times the compute, less activation memory; the reference.
Pruning: prune_snip prunes every layer at once from scores of the original model (Wei et al.);
prune_snip_sequential prunes front to back and re-scores each layer on the model whose earlier
layers are already pruned, so a layer's scores reflect the inputs it will actually receive.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from lm.errors import UserError
from lm.hooks import decoder_layers, hooks_registered

from .blockwise import block_linears
from .sparsity import SparsityPattern, prune_mask

Batch = dict[str, torch.Tensor]  # input_ids, attention_mask, labels (see calibration.tokenize_pairs)


def decoder_linear_weights(model: nn.Module, layers: Iterable[int] | None = None) -> dict[str, nn.Parameter]:
    """{'model.layers.{i}.{name}.weight': weight} for the chosen decoder layers (all by default)."""
    blocks = decoder_layers(model)
    indices = range(len(blocks)) if layers is None else layers
    return {f"model.layers.{i}.{name}.weight": lin.weight for i in indices for name, lin in block_linears(blocks[i]).items()}


def response_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled (response) tokens."""
    device = next(model.parameters()).device
    labels = batch["labels"].to(device)
    if not (labels[:, 1:] != -100).any():
        raise UserError("a SNIP batch has no response tokens to score")
    logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device), use_cache=False).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)


def snip_score(weight: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """|W * dL/dW|: the first-order change in loss from zeroing each weight, sign dropped."""
    return (weight.detach().float() * grad.float()).abs_()


@contextmanager
def gradients_only_for(model: nn.Module, params: list[nn.Parameter]):
    """Eval mode, and requires_grad on `params` alone; flags and mode are restored on exit."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    try:
        model.eval()
        for p, _ in flags:
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        with torch.enable_grad():
            yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


def accumulate_snip(model: nn.Module, weights: dict[str, nn.Parameter], batches: list[Batch]) -> dict[str, torch.Tensor]:
    """Summed SNIP scores of `weights` over `batches`, one forward + backward per batch.

    Each weight's gradient is turned into its score as soon as backward has produced it and is
    then dropped, so at most a few layers' gradients exist at a time instead of the whole
    model's (for a one-pass run over all layers that is a model-sized saving).
    """
    if not batches:
        raise UserError("SNIP needs at least one calibration batch")
    scores = {name: torch.zeros(p.shape, dtype=torch.float32) for name, p in weights.items()}
    name_of = {id(p): name for name, p in weights.items()}

    def consume(param: torch.Tensor) -> None:
        scores[name_of[id(param)]] += snip_score(param, param.grad).cpu()
        param.grad = None

    params = list(weights.values())
    earlier = [p.grad for p in params]  # a caller's own gradients are put back afterwards
    try:
        with gradients_only_for(model, params), hooks_registered([p.register_post_accumulate_grad_hook(consume) for p in params]):
            for p in params:
                p.grad = None
            for batch in batches:
                response_loss(model, batch).backward()
    finally:
        for p, g in zip(params, earlier):
            p.grad = g
    return scores


def snip_scores_one_pass(model: nn.Module, batches: list[Batch]) -> dict[str, torch.Tensor]:
    return accumulate_snip(model, decoder_linear_weights(model), batches)


def layer_snip_scores(model: nn.Module, index: int, batches: list[Batch]) -> dict[str, torch.Tensor]:
    return accumulate_snip(model, decoder_linear_weights(model, [index]), batches)


def snip_scores_per_layer(model: nn.Module, batches: list[Batch]) -> dict[str, torch.Tensor]:
    scores = {}
    for index in range(len(decoder_layers(model))):
        scores.update(layer_snip_scores(model, index, batches))
    return scores


@torch.no_grad()
def prune_snip(model: nn.Module, scores: dict[str, torch.Tensor], pattern: SparsityPattern) -> None:
    """Zero the lowest-scoring weights of each scored matrix, per output row (or M-group), in place."""
    pattern.validate_for(model)
    weights = decoder_linear_weights(model)
    unknown = sorted(set(scores) - set(weights))
    if unknown:
        raise UserError(f"SNIP scores for unknown weights: {unknown[:3]}")
    for name, score in scores.items():
        weight = weights[name]
        if score.shape != weight.shape:
            raise UserError(f"SNIP scores for {name} have shape {tuple(score.shape)}, weight has {tuple(weight.shape)}")
        weight[prune_mask(score.to(weight.device), pattern)] = 0


def prune_snip_sequential(model: nn.Module, batches: list[Batch], pattern: SparsityPattern) -> None:
    """Score and prune one decoder layer at a time, front to back, re-scoring on the pruned prefix."""
    pattern.validate_for(model)
    for index in range(len(decoder_layers(model))):
        prune_snip(model, layer_snip_scores(model, index, batches), pattern)

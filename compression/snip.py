"""SNIP importance (Lee et al. 2019) as Wei et al. (2024) use it to attribute behaviour to weights.

    score(W) = sum over calibration batches b of |W * dL_b/dW|

L_b is the mean next-token cross-entropy over the response tokens of batch b (prompt and padding
are labelled -100). The absolute value is taken per batch before summing; with one sample per
batch (the default of ResponseCalibrationConfig) that is Wei et al.'s per-example accumulation.
Bigger batches take |.| of a batch-mean gradient, where gradients of different samples can cancel:
cheaper, but a different score.

Scores are kept as float32 on the CPU. Two ways to get the same scores (up to float32 rounding):
  snip_scores_one_pass    one forward + backward per pack of batches yields every layer's
                          gradient (each batch's own); see its docstring for what it leaves out.
  snip_scores_per_layer   Wei et al.'s loop (prune_wandg in their alignment-attribution code): per
                          decoder layer, a forward + backward of the full model in which only that
                          layer's weights require grad (autograd then keeps no graph for earlier
                          layers). L forward passes per batch, less activation memory; the
                          reference, kept as they run it (full logits, autograd's .grad).
Pruning: prune_snip prunes every layer at once from scores of the original model (Wei et al.);
prune_snip_sequential prunes front to back and re-scores each layer on the model whose earlier
layers are already pruned, so a layer's scores reflect the inputs it will actually receive.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from lm.architecture import decoder_linears
from lm.errors import UserError
from lm.experts import token_grid
from lm.hooks import decoder_layers, hooks_registered
from lm.trainable import gradients_only_for

from .sparsity import SparsityPattern, prune_mask

Batch = dict[str, torch.Tensor]  # input_ids, attention_mask, labels (see calibration.tokenize_pairs)


def decoder_linear_weights(model: nn.Module, layers: Iterable[int] | None = None) -> dict[str, nn.Parameter]:
    """{'model.layers.{i}.{name}.weight': weight} for the chosen decoder layers (all by default)."""
    return {name: lin.weight for name, lin in decoder_linears(model, layers).items()}


def response_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled (response) tokens."""
    device = next(model.parameters()).device
    labels = batch["labels"].to(device)
    if not (labels[:, 1:] != -100).any():
        raise UserError("a SNIP batch has no response tokens to score")
    logits = model(
        input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device), use_cache=False
    ).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)


def snip_score(weight: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """|W * dL/dW|: the first-order change in loss from zeroing each weight, sign dropped."""
    return (weight.detach().float() * grad.float()).abs_()


def accumulate_snip(
    model: nn.Module, weights: dict[str, nn.Parameter], batches: list[Batch]
) -> dict[str, torch.Tensor]:
    """Summed SNIP scores of `weights` over `batches`, one forward + backward per batch, from
    autograd's .grad (the reference; snip_scores_one_pass gets there without .grad).

    Each weight's gradient is turned into its score as soon as backward has produced it and is
    then dropped, so at most a few layers' gradients exist at a time.
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
        with (
            gradients_only_for(model, params),
            hooks_registered([p.register_post_accumulate_grad_hook(consume) for p in params]),
        ):
            for p in params:
                p.grad = None
            for batch in batches:
                response_loss(model, batch).backward()
    finally:
        for p, g in zip(params, earlier):
            p.grad = g
    return scores


@dataclass(frozen=True)
class OnePassConfig:
    # Calibration batches run through the model together (right padded to a common length); each
    # keeps its own loss and its own |W * grad|. Larger GEMMs, and the model-sized scores and
    # weights are streamed through memory once per pack instead of once per batch.
    batches_per_pass: int = 4
    # Elements of one tile of a weight gradient on the CPU; two tiles (gradient, running sum)
    # fit a core's L2 cache, so dY^T X and |.| meet in cache instead of in a 17 MB buffer.
    tile_elements: int = 1 << 17

    def __post_init__(self):
        if self.batches_per_pass <= 0 or self.tile_elements <= 0:
            raise UserError("batches_per_pass and tile_elements must be positive")


Group = tuple[slice, int]  # one calibration batch inside a pack: its rows, its own length


def pack(batches: list[Batch]) -> tuple[Batch, list[Group]]:
    """Stack batches row-wise, right padded to the longest (masked, labelled -100)."""
    width = max(b["input_ids"].shape[1] for b in batches)
    groups, row = [], 0
    for b in batches:
        n = b["input_ids"].shape[0]
        groups.append((slice(row, row + n), b["input_ids"].shape[1]))
        row += n
    fill = dict(input_ids=0, attention_mask=0, labels=-100)  # pad ids are masked out: any id works
    return {
        key: torch.cat([F.pad(b[key], (0, width - b[key].shape[1]), value=value) for b in batches])
        for key, value in fill.items()
    }, groups


def packed_response_loss(model: nn.Module, batch: Batch, groups: list[Group]) -> torch.Tensor:
    """Sum over groups of response_loss(group): each batch's mean over its own response tokens,
    so every batch gets exactly the gradient it would get alone.

    The LM head (as large as ~9 decoder blocks of a 0.5B model) runs only at positions whose
    next token is labelled (Hugging Face's logits_to_keep mask); the loss reads no others.
    """
    device = next(model.parameters()).device
    targets = batch["labels"].to(device)[:, 1:]
    read = targets != -100  # logits at t predict token t + 1
    per_row = read.sum(1).tolist()
    counts = [sum(per_row[rows]) for rows, _ in groups]
    if min(counts) == 0:
        raise UserError("a SNIP batch has no response tokens to score")
    keep = F.pad(read, (0, 1), value=False)  # the last position predicts nothing
    logits = model(
        input_ids=batch["input_ids"].to(device),
        attention_mask=batch["attention_mask"].to(device),
        use_cache=False,
        logits_to_keep=keep,
    ).logits  # [kept positions, vocab], row by row
    wanted = targets[read]
    bounds = torch.tensor([0, *counts]).cumsum(0).tolist()
    return sum(F.cross_entropy(logits[a:b].float(), wanted[a:b]) for a, b in zip(bounds, bounds[1:]))


def _weight_grad(dy: torch.Tensor, x: torch.Tensor, out: torch.Tensor) -> None:
    if dy.dtype == out.dtype:
        torch.mm(dy.t(), x, out=out)
    else:  # a half-precision model: its gradient is rounded to the model dtype, as autograd's is
        out.copy_(dy.t() @ x)


def add_snip_from_activations(
    score: torch.Tensor,
    weight: torch.Tensor,
    x: torch.Tensor,
    dy: torch.Tensor,
    groups: list[Group],
    scratch: torch.Tensor,
) -> None:
    """score += sum over groups g of |W * dY_g^T X_g|: SNIP of one linear layer y = x W^T (+ b).

    x: [rows, length, in] inputs and dy: [rows, length, out] output gradients of a pack; each
    group's weight gradient dY_g^T X_g is that batch's dL/dW (its padding has dY = 0, as in
    autograd). Since |W * G1| + |W * G2| = |W| * (|G1| + |G2|), W and score are read once per
    pack. scratch: flat float32 on x's device, overwritten; gradients are built in tiles of
    output rows, two tiles to a scratch.
    """
    n_out, n_in = weight.shape
    parts = [(x[rows, :length].reshape(-1, n_in), dy[rows, :length].reshape(-1, n_out)) for rows, length in groups]
    tile = max(1, min(n_out, scratch.numel() // (2 * n_in)))
    for start in range(0, n_out, tile):
        stop = min(start + tile, n_out)
        size = (stop - start) * n_in
        total, grad = scratch[:size].view(-1, n_in), scratch[size : 2 * size].view(-1, n_in)
        for i, (x2, dy2) in enumerate(parts):
            if i == 0:
                _weight_grad(dy2[:, start:stop], x2, total)
                total.abs_()
            else:
                _weight_grad(dy2[:, start:stop], x2, grad)
                total.add_(grad.abs_())
        score[start:stop].add_(total.mul_(weight[start:stop]).abs_().to(score.device))


def snip_scores_one_pass(
    model: nn.Module, batches: list[Batch], cfg: OnePassConfig = OnePassConfig()
) -> dict[str, torch.Tensor]:
    """Every decoder linear's SNIP score, one forward + backward per pack of batches.

    No parameter requires grad. A linear's weight gradient is dY^T X: X kept by a forward hook,
    dY handed to a hook on the linear's output during backward, and turned into the score there,
    tile by tile. So backward computes no gradient for embeddings, norms or the LM head, stops
    at the first decoder layer's linears, and no model-sized gradient is allocated per batch
    (on a CPU, faulting in fresh pages for them cost as much as the arithmetic; see
    benchmarks/RESULTS.md); the LM head runs only where the loss reads it.
    """
    if not batches:
        raise UserError("SNIP needs at least one calibration batch")
    linears = decoder_linears(model)
    scores = {name: torch.zeros(lin.weight.shape, dtype=torch.float32) for name, lin in linears.items()}
    # Backward visits one linear at a time: one scratch per device serves them all.
    scratch: dict[torch.device, torch.Tensor] = {}
    leaves: list[torch.Tensor] = []
    current: dict[str, list[Group]] = {}

    def on_forward(name: str, lin: nn.Linear):
        weight = lin.weight
        if weight.device not in scratch:  # off the CPU, whole gradients (no cache to fit)
            size = cfg.tile_elements if weight.device.type == "cpu" else max(w.weight.numel() for w in linears.values())
            scratch[weight.device] = torch.empty(2 * size, dtype=torch.float32, device=weight.device)
        buffer = scratch[weight.device]

        def hook(module, args, out):
            groups, grid = (
                current["groups"],
                token_grid(module, current["shape"]),
            )  # an expert's routed rows back on the grid
            x = grid(args[0])
            if not out.requires_grad:  # nothing before it is scored: the backward graph starts here
                out.requires_grad_()
                leaves.append(out)
            out.register_hook(lambda dy: add_snip_from_activations(scores[name], weight, x, grid(dy), groups, buffer))

        return hook

    with (
        gradients_only_for(model, []),
        hooks_registered([lin.register_forward_hook(on_forward(n, lin)) for n, lin in linears.items()]),
    ):
        for start in range(0, len(batches), cfg.batches_per_pass):
            batch, current["groups"] = pack(batches[start : start + cfg.batches_per_pass])
            current["shape"] = tuple(batch["input_ids"].shape)
            try:
                loss = packed_response_loss(model, batch, current["groups"])
                # Gradients w.r.t. the first scored outputs: backward goes exactly that far down,
                # and every scored output's hook fires on the way.
                torch.autograd.grad(loss, leaves)
            finally:
                leaves.clear()
    return scores


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

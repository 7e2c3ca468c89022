"""Acting on a refusal direction: weight orthogonalization and activation addition.

Orthogonalization bakes directional ablation into the weights (Arditi et al. 2024, §4.1): if no
matrix that writes into the residual stream can write along r, the stream never has an r
component, which is what ablating r from every block input and every attention/MLP output does
with hooks. The result is an ordinary checkpoint (save it with `save_pretrained`).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from lm.architecture import residual_writers
from lm.errors import UserError
from lm.experts import expert_linears, experts_as_linears
from lm.hooks import decoder_layers, intervene


def _unit(direction: torch.Tensor) -> torch.Tensor:
    direction = direction.detach().to(torch.float32).flatten()
    norm = direction.norm()
    if not torch.isfinite(norm) or norm == 0:
        raise UserError("cannot orthogonalize against a zero or non-finite direction")
    return direction / norm


def _project_output_rows(writer: nn.Linear, unit: torch.Tensor) -> None:
    """W <- W - r (r^T W) for a linear's weight [d_model, in], and b <- b - (b . r) r, so every
    output is orthogonal to r (float32 math)."""
    for param, edit in (
        (writer.weight, lambda w: w - unit.view(-1, 1) * (unit @ w)),
        (writer.bias, lambda b: b - (b @ unit) * unit),
    ):
        if param is not None:
            param.data.copy_(edit(param.data.to(torch.float32)))


def _untie_output_embeddings(model: nn.Module) -> None:
    """Give the LM head its own copy of tied embedding weights.

    Orthogonalizing a tied embedding would also project r out of the unembedding, changing the
    logits in a way hook ablation does not; the head must keep the original weights.
    """
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or head.weight is not embed.weight:
        return
    head.weight = nn.Parameter(embed.weight.detach().clone(), requires_grad=embed.weight.requires_grad)
    model.config.tie_word_embeddings = False
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else None
    if text_config is not None:
        text_config.tie_word_embeddings = False


@torch.no_grad()
def orthogonalize_weights(model: nn.Module, direction: torch.Tensor) -> nn.Module:
    """Project `direction` out of every matrix writing into the residual stream, in place.

    Embedding rows (W <- W - (W r) r^T), every attention output projection and MLP down projection
    (every expert's, in a mixture of experts) and their biases, as lm.architecture.residual_writers
    names them. Tied input/output embeddings are untied first (see _untie_output_embeddings).
    A post-norm family (Gemma 2 / 3, OLMo 2) is refused: a norm sits between those weights and the
    stream, so no weight edit matches hook ablation.
    """
    unit = _unit(direction)
    residual_writers(model, decoder_layers(model)[0])  # a post-norm family fails before anything is edited
    embed = model.get_input_embeddings()
    if embed is None or embed.weight.shape[-1] != unit.shape[0]:
        raise UserError(f"direction has {unit.shape[0]} dims; the model's embeddings do not match")
    _untie_output_embeddings(model)
    w = embed.weight.data
    w32 = w.to(torch.float32)
    r = unit.to(w.device)
    w.copy_(w32 - torch.outer(w32 @ r, r))
    with experts_as_linears(model):  # each expert's down projection (and bias) is then a linear like any other
        for block in decoder_layers(model):
            for writer in residual_writers(model, block):
                for linear in [writer] if isinstance(writer, nn.Linear) else expert_linears(writer, "down_proj"):
                    if linear.out_features != unit.shape[0]:
                        raise UserError(
                            f"{type(writer).__name__} writes {linear.out_features} dims into a {unit.shape[0]}-dim stream"
                        )
                    _project_output_rows(linear, unit.to(linear.weight.device))
    return model


@contextmanager
def activation_addition(model: nn.Module, vector: torch.Tensor, layer: int, coeff: float = 1.0):
    """Add coeff * vector to block `layer`'s input at every position while the block runs.

    A negative coeff subtracts it (Arditi et al. use the raw difference of means, coeff 1, to
    induce refusal, and -1 to suppress it).
    """
    n_layers = len(decoder_layers(model))
    if not 0 <= layer < n_layers:
        raise UserError(f"layer {layer} out of range for a model with {n_layers} blocks")
    with intervene(model, add={layer: coeff * vector}) as m:
        yield m


@contextmanager
def directional_ablation(model: nn.Module, direction: torch.Tensor):
    """Hook-based equivalent of orthogonalize_weights, without touching the weights."""
    with intervene(model, ablate=direction) as m:
        yield m

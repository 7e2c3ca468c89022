"""Partial forward passes: up to a block's input, or from a block's input to the next-token logits.

`input_of_block` runs the model only as far as block l and returns what it receives (the residual
stream at that depth and the keyword arguments every block gets), stopping the pass there.
Scoring an intervention that first acts at layer l does not need blocks 0..l-1 again: their
outputs equal an unmodified run's. `layer_inputs` keeps those block inputs from one baseline pass,
and `run_from_layer` continues from any of them through the remaining blocks, the final norm and
the LM head at the last position only (full-vocabulary logits at every position are the largest
tensor of a forward pass, and nothing here reads them).
"""

from __future__ import annotations

import torch
from torch import nn

from .architecture import backbone, final_norm, logits_from_normed
from .errors import UserError
from .hooks import StopForward, block_input, block_output, decoder_layers, hooks_registered


@torch.no_grad()
def last_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Logits of the next token after each (left-padded) row: [batch, vocab]."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=1)
    return out.logits[:, -1]


def uniform_layers(model: nn.Module) -> bool:
    """Whether every block receives the same keyword arguments (no sliding-window/global mix).

    Models that alternate attention types pass each block a different mask, which block 0's
    arguments cannot stand in for.
    """
    types = getattr(model.config, "layer_types", None)
    return types is None or len(set(types)) <= 1


def input_of_block(
    model: nn.Module, layer: int, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
) -> tuple[torch.Tensor, dict]:
    """Block `layer`'s hidden-state input ([batch, seq, d]) and the keyword arguments (mask, rotary
    embeddings, position ids) a normal forward gives the blocks; the pass stops there. Gradients flow
    when enabled by the caller (an objective read at a source layer)."""
    blocks = decoder_layers(model)
    if not 0 <= layer < len(blocks):
        raise UserError(f"layer {layer} out of range for a model with {len(blocks)} blocks")
    found = {}

    def grab(module, args, kwargs):
        found["hidden"] = block_input(args, kwargs)
        found["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        raise StopForward

    with hooks_registered([blocks[layer].register_forward_pre_hook(grab, with_kwargs=True)]):
        try:
            backbone(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except StopForward:
            pass
    return found["hidden"], found["kwargs"]


@torch.no_grad()
def block0_input(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
) -> tuple[torch.Tensor, dict]:
    """`input_of_block` at block 0: costs only the embedding lookup."""
    return input_of_block(model, 0, input_ids, attention_mask)


def block_kwargs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> dict:
    """The keyword arguments every block receives, for resuming a pass from any layer."""
    if not uniform_layers(model):
        raise UserError("this model's layers use different attention masks; it cannot be resumed from a layer")
    return block0_input(model, input_ids, attention_mask)[1]


@torch.no_grad()
def layer_inputs(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """One full pass: every block's input at all positions ([batch, seq, d] each) and last_logits.

    Kept in the model's dtype and on its device: they are fed straight back into the blocks.
    """
    stored: dict[int, torch.Tensor] = {}
    handles = []
    for index, block in enumerate(decoder_layers(model)):

        def pre(module, args, kwargs, index=index):
            stored[index] = block_input(args, kwargs)

        handles.append(block.register_forward_pre_hook(pre, with_kwargs=True))
    with hooks_registered(handles):
        logits = last_logits(model, input_ids, attention_mask)
    return [stored[i] for i in range(len(stored))], logits


@torch.no_grad()
def run_from_layer(model: nn.Module, hidden: torch.Tensor, kwargs: dict, layer: int) -> torch.Tensor:
    """Continue a forward pass from block `layer`'s input `hidden`: next-token logits [batch, vocab].

    `kwargs` come from `block_kwargs` for a batch of the same shape. Hooks on the blocks that run
    (e.g. `lm.hooks.intervene`) apply as in a full pass.
    """
    blocks = decoder_layers(model)
    if not 0 <= layer < len(blocks):
        raise UserError(f"layer {layer} out of range for a model with {len(blocks)} blocks")
    norm = final_norm(model)
    for block in blocks[layer:]:
        hidden = block_output(block(hidden, **kwargs))
    # The norm is per position, so normalising only the last one gives the same values.
    return logits_from_normed(model, norm(hidden[:, -1:]))[:, -1]

"""Magnitude pruning baseline: |W_ij|, compared within each output row (as Wanda compares)."""

from __future__ import annotations

import torch
from torch import nn

from lm.hooks import decoder_layers

from .blockwise import block_linears
from .sparsity import SparsityPattern, prune_mask


@torch.no_grad()
def prune_magnitude(model: nn.Module, pattern: SparsityPattern) -> None:
    pattern.validate_for(model)
    for block in decoder_layers(model):
        for linear in block_linears(block).values():
            linear.weight[prune_mask(linear.weight.abs().float(), pattern)] = 0

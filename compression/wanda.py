"""Wanda (Sun et al. 2024): prune by |W_ij| * ||X_j||_2, compared within each output row."""

from __future__ import annotations

import torch
from torch import nn

from .blockwise import compress_blockwise
from .calibration import Calibration
from .sparsity import SparsityPattern, prune_mask


class InputNorms:
    """Running sum of squared inputs per input feature (||X_j||_2^2 over calibration tokens)."""

    def __init__(self, linear: nn.Linear):
        self.sq = torch.zeros(linear.in_features, dtype=torch.float64, device=linear.weight.device)

    def add(self, x: torch.Tensor) -> None:
        self.sq += (x.double() ** 2).sum(dim=0)


def wanda_scores(weight: torch.Tensor, input_sq_norms: torch.Tensor) -> torch.Tensor:
    """|W_ij| * ||X_j||_2: the weight's magnitude times the norm of the input feature it reads."""
    return weight.abs().float() * input_sq_norms.sqrt().float().unsqueeze(0)


def prune_wanda(model: nn.Module, calibration: Calibration, pattern: SparsityPattern) -> None:
    """Block-sequential Wanda pruning of every decoder linear layer, in place."""
    pattern.validate_for(model)

    def prune(name, linear, norms: InputNorms):
        mask = prune_mask(wanda_scores(linear.weight, norms.sq), pattern)
        linear.weight[mask] = 0

    compress_blockwise(model, calibration, InputNorms, prune, desc=f"Wanda {pattern}")

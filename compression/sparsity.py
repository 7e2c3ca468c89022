"""Sparsity patterns and the masks that realise them from importance scores (low score = pruned)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lm.errors import UserError


@dataclass(frozen=True)
class SparsityPattern:
    """Unstructured per-output-row sparsity (`ratio`), or N:M: n of every m consecutive inputs pruned."""

    ratio: float = 0.5
    n: int = 0
    m: int = 0

    def __post_init__(self):
        if self.structured:
            if not (0 < self.n < self.m):
                raise UserError(f"N:M sparsity needs 0 < N < M, got {self.n}:{self.m}")
        elif not 0 <= self.ratio < 1:
            raise UserError(f"sparsity must be in [0, 1), got {self.ratio}")

    @property
    def structured(self) -> bool:
        # Any N or M given makes the pattern N:M, so '2:0' or '-1:-2' fails the check above
        # instead of silently running the default unstructured ratio under an N:M label.
        return self.m != 0 or self.n != 0

    @property
    def target(self) -> float:
        return self.n / self.m if self.structured else self.ratio

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.structured else f"{self.ratio:.0%}"

    @classmethod
    def parse(cls, text: str) -> "SparsityPattern":
        """'0.5', '50%' or '2:4'."""
        text = text.strip()
        try:
            if ":" in text:
                n, m = (int(x) for x in text.split(":"))
                if not 0 < n < m:  # '0:0' would otherwise read as the default unstructured ratio
                    raise UserError(f"N:M sparsity needs 0 < N < M, got {n}:{m}")
                return cls(n=n, m=m)
            return cls(ratio=float(text.rstrip("%")) / (100 if text.endswith("%") else 1))
        except ValueError:
            raise UserError(f"cannot parse sparsity {text!r}; use e.g. 0.5, 50% or 2:4") from None

    def validate_for(self, model: nn.Module) -> None:
        if not self.structured:
            return
        from lm.hooks import decoder_layers

        from .blockwise import block_linears

        for lin in block_linears(decoder_layers(model)[0]).values():
            if lin.in_features % self.m:
                raise UserError(f"N:M sparsity {self}: M={self.m} does not divide input width {lin.in_features}")


def prune_mask(scores: torch.Tensor, pattern: SparsityPattern) -> torch.Tensor:
    """Boolean mask of the weights to zero: the lowest scores within each row (or each M-group)."""
    rows, cols = scores.shape
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if pattern.structured:
        if cols % pattern.m:
            raise UserError(f"N:M sparsity {pattern}: M={pattern.m} does not divide input width {cols}")
        groups = scores.reshape(rows, cols // pattern.m, pattern.m)
        lowest = groups.topk(pattern.n, dim=-1, largest=False).indices
        return mask.reshape(rows, cols // pattern.m, pattern.m).scatter_(-1, lowest, True).reshape(rows, cols)
    k = int(cols * pattern.ratio)
    if k == 0:
        return mask
    lowest = scores.topk(k, dim=1, largest=False).indices
    return mask.scatter_(1, lowest, True)

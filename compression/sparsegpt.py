"""SparseGPT (Frantar & Alistarh 2023): one-shot pruning with optimal-brain-surgeon weight updates.

For one linear layer with calibration inputs X, the layer-wise loss ||X W^T - X W'^T||^2 has
Hessian H = 2 X^T X, shared by every output row. Columns are pruned left to right; when the
weights of column j are removed, the weights of the columns right of j absorb the error with the
OBS update computed from the inverse Hessian of the columns that are still free (j onwards).
Those inverses are all rows of one matrix: the upper Cholesky factor U of H^-1 (row j of U is the
first row of inv(H[j:, j:]) divided by its square root), so the whole sweep costs one Cholesky.

Mask selection follows the paper's Algorithm 1 ("adaptive mask selection"): at the start of every
block of `blocksize` columns, the pruned weights are the lowest w^2 / U_jj^2 over the whole block
(all rows together), using the weights as already updated by earlier blocks. Each block, hence the
layer, has exactly the target sparsity; single rows do not (unlike Wanda's per-row comparison).
For N:M the choice is made per row within each group of M columns, when the sweep reaches it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from lm.errors import UserError

from .blockwise import compress_blockwise
from .calibration import Calibration
from .sparsity import SparsityPattern


@dataclass(frozen=True)
class SparseGPTConfig:
    blocksize: int = 128  # columns per lazy-update block and per mask-selection block (paper: 128)
    percdamp: float = 0.01  # dampening, as a fraction of the mean Hessian diagonal
    # Precision of the Hessian, accumulated and inverted. float32 is llm-compressor's (SGPT_PRECISION); on 2:4 the
    # mask choices cascade from block to block, and float32 rounding alone moved the embedded model's
    # perplexity by 6-10% (benchmarks/sparsegpt_precision.py).
    precision: Literal["float64", "float32"] = "float64"

    def __post_init__(self):
        if self.blocksize <= 0:
            raise UserError(f"SparseGPT blocksize must be positive, got {self.blocksize}")
        if self.percdamp < 0:
            raise UserError(f"SparseGPT percdamp must be >= 0, got {self.percdamp}")
        if self.precision not in ("float64", "float32"):
            raise UserError(f"SparseGPT precision must be float64 or float32, got {self.precision!r}")

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.precision)

    def validate_for(self, pattern: SparsityPattern) -> None:
        # An M-group straddling two blocks would be chosen before its second half had received the
        # first block's updates.
        if pattern.structured and self.blocksize % pattern.m:
            raise UserError(f"SparseGPT blocksize {self.blocksize} must be a multiple of M={pattern.m} for {pattern}")


class Hessian:
    """Running X^T X over calibration tokens, in float64 by default so many small batches add up exactly."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype = torch.float64):
        self.xtx = torch.zeros(linear.in_features, linear.in_features, dtype=dtype, device=linear.weight.device)
        self.n_tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.to(self.xtx.dtype)
        self.xtx.addmm_(x.T, x)
        self.n_tokens += x.shape[0]

    def matrix(self) -> torch.Tensor:
        """H = 2 X^T X / n: dividing by the token count only rescales, which dampening is relative to."""
        return 2 * self.xtx / max(self.n_tokens, 1)


def inverse_hessian_factor(
    hessian: torch.Tensor, percdamp: float, dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, dead): U the upper Cholesky factor of (H + damp I)^-1 in `dtype`; dead the inputs that were always 0.

    A dead input's row and column of H are zero, so it is decoupled from every other input; a unit
    diagonal there keeps H invertible without affecting the rest (its weights are zeroed anyway).
    """
    h = hessian.to(dtype).clone()
    diag = h.diagonal()
    dead = diag == 0
    live_mean = diag[~dead].mean() if (~dead).any() else h.new_tensor(1.0)
    diag[dead] = 1
    diag.add_(percdamp * live_mean)
    lower, info = torch.linalg.cholesky_ex(h)
    if info.item():
        raise UserError(f"SparseGPT: the damped Hessian is not positive definite; raise percdamp (now {percdamp})")
    return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True), dead


def obs_scores(weights: torch.Tensor, u_diag: torch.Tensor) -> torch.Tensor:
    """w^2 / [H^-1]_jj: the OBS increase in layer loss from zeroing each weight (U_jj^2 = [inv(H[j:, j:])]_00)."""
    return weights**2 / u_diag.unsqueeze(0) ** 2


def _lowest_in_block(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    k = int(scores.numel() * ratio)
    if k:
        mask[scores.flatten().topk(k, largest=False).indices] = True
    return mask.reshape(scores.shape)


def _lowest_per_row(scores: torch.Tensor, n: int) -> torch.Tensor:
    lowest = scores.topk(n, dim=1, largest=False).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, lowest, True)


@torch.no_grad()
def sparsegpt_prune(
    weight: torch.Tensor, hessian: torch.Tensor, pattern: SparsityPattern, cfg: SparseGPTConfig = SparseGPTConfig()
) -> torch.Tensor:
    """The pruned and OBS-updated weight [out, in] (float32); `weight` itself is not modified."""
    cfg.validate_for(pattern)
    if pattern.structured and weight.shape[1] % pattern.m:
        raise UserError(f"N:M sparsity {pattern}: M={pattern.m} does not divide input width {weight.shape[1]}")
    u, dead = inverse_hessian_factor(hessian, cfg.percdamp, cfg.dtype)
    u = u.float().to(weight.device)
    w = weight.detach().float().clone()
    w[:, dead.to(w.device)] = 0
    pruned = torch.zeros_like(w, dtype=torch.bool)
    cols = w.shape[1]
    for start in range(0, cols, cfg.blocksize):
        end = min(start + cfg.blocksize, cols)
        block, u_block = w[:, start:end], u[start:end, start:end]
        d = u_block.diagonal()
        mask = pruned[:, start:end]
        if not pattern.structured:
            mask[:] = _lowest_in_block(obs_scores(block, d), pattern.ratio)
        errors = torch.zeros_like(block)
        for j in range(end - start):
            if pattern.structured and j % pattern.m == 0:
                group = slice(j, j + pattern.m)
                mask[:, group] = _lowest_per_row(obs_scores(block[:, group], d[group]), pattern.n)
            # Scaled error of zeroing the pruned weights of column j; kept weights contribute none.
            err = torch.where(mask[:, j], block[:, j] / d[j], torch.zeros_like(block[:, j]))
            block[:, j:] -= err.unsqueeze(1) * u_block[j, j:].unsqueeze(0)
            errors[:, j] = err
        # Lazy batch update: the block's accumulated errors reach the later columns in one matmul.
        w[:, end:] -= errors @ u[start:end, end:]
    w[pruned] = 0  # the update already drove them to ~0; make them exact zeros
    return w


def prune_sparsegpt(
    model: nn.Module,
    calibration: Calibration,
    pattern: SparsityPattern,
    blocksize: int = 128,
    percdamp: float = 0.01,
    precision: str = "float64",
) -> None:
    """Block-sequential SparseGPT pruning of every decoder linear layer, in place."""
    pattern.validate_for(model)
    cfg = SparseGPTConfig(blocksize, percdamp, precision)
    cfg.validate_for(pattern)

    def prune(name, linear, hessian: Hessian):
        linear.weight.copy_(sparsegpt_prune(linear.weight, hessian.matrix(), pattern, cfg).to(linear.weight.dtype))

    compress_blockwise(
        model, calibration, lambda linear: Hessian(linear, cfg.dtype), prune, desc=f"SparseGPT {pattern}"
    )

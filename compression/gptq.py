"""GPTQ (Frantar et al. 2022): one-shot weight quantization with optimal-brain-surgeon error feedback.

For one linear layer with calibration inputs X, the layer-wise loss ||X W^T - X Q^T||^2 has
Hessian H = 2 X^T X, shared by every output row. Columns are quantized one at a time in a fixed
order; after column j is rounded, the columns not yet quantized absorb its rounding error with the
OBS update from the inverse Hessian of the still-free columns. As in SparseGPT (whose Hessian
collector and inverse factor this module reuses), all those inverses are rows of the upper
Cholesky factor U of (H + damp I)^-1: with d = U_jj,

    err = (w_j - quant(w_j)) / d,    w_{j:} -= err * U_{j, j:}

Updates are applied lazily: inside a block of `blocksize` columns the rank-1 updates touch only
the block; the block's accumulated errors reach the later columns in one matmul at its end.

Grid. Symmetric and group-wise along the input dimension, exactly RTN's grid (compression/rtn.py):
scale = max|w| / (2^(b-1) - 1) per (row, group), codes clamped to [-2^(b-1), 2^(b-1) - 1]; so
GPTQ and RTN variants at the same bits / group size differ only in how weights are rounded. A
group's scale is fixed when the sweep enters the group, from the group's weights as they are then
(already moved by the error feedback of every earlier column), as the paper's reference code does
(its non-static groups). Later members may drift past the group's max before being rounded; the
clamp keeps them on the grid. With an identity Hessian no error flows and GPTQ is exactly RTN.

Act-order (`act_order`, the reference's desc_act; off by default): columns are processed by
decreasing Hessian diagonal, so the inputs with the most energy are rounded while the most free
columns remain to absorb their error. Groups still refer to original column indices (columns
k*g .. (k+1)*g - 1 share a scale), so the stored grid is the same as without act-order; a
group's scale is fixed when the sweep first reaches any of its columns.

The result is stored dequantized in the float weights (scale * integer code), so the variant is a
plain float checkpoint; the manifest records bits and group size (the variant's params).

Why in-package rather than a library: gptqmodel and llmcompressor both run GPTQ on CPU here
(../shared/notes/toolchain.md), but llmcompressor pins transformers <= 5.17 (it would downgrade
ours), and gptqmodel stores packed integer kernels that need its own loader and compiles an
extension on first use. This GPTQ shares SparseGPT's Hessian machinery, runs on our calibration
set block-sequentially (compress_blockwise, like Wanda and SparseGPT), and yields a dequantized
float checkpoint that any analysis loads with plain transformers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lm.architecture import block_prefix
from lm.errors import UserError
from lm.hooks import decoder_layers

from .blockwise import block_linears, compress_blockwise
from .calibration import Calibration
from .rtn import QuantConfig
from .sparsegpt import Hessian, inverse_hessian_factor


@dataclass(frozen=True)
class GPTQConfig:
    bits: int = 4
    group_size: int | None = 128  # None: one scale per output row
    blocksize: int = 128  # columns per lazy-update block (paper: 128)
    percdamp: float = 0.01  # dampening, as a fraction of the mean Hessian diagonal
    act_order: bool = False  # columns by decreasing Hessian diagonal (reference: desc_act)

    def __post_init__(self):
        QuantConfig(self.bits, self.group_size)  # the same bits / group rules as RTN
        if self.blocksize <= 0:
            raise UserError(f"GPTQ blocksize must be positive, got {self.blocksize}")
        if self.percdamp < 0:
            raise UserError(f"GPTQ percdamp must be >= 0, got {self.percdamp}")


def symmetric_scale(weights: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-row scale [rows] of a [rows, k] group: the same formula as rtn.quantize_rtn."""
    return weights.abs().amax(dim=1).clamp(min=1e-12) / (2 ** (bits - 1) - 1)


def round_to_grid(column: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Dequantized symmetric rounding of one column [rows] with per-row scales [rows]."""
    qmax = 2 ** (bits - 1) - 1
    return torch.clamp(torch.round(column / scale), -qmax - 1, qmax) * scale


def group_width(cols: int, group_size: int | None) -> int:
    group = cols if group_size is None else group_size
    if cols % group:
        raise UserError(f"group size {group} does not divide input width {cols}")
    return group


def sweep_order(hessian: torch.Tensor, act_order: bool) -> torch.Tensor:
    """Original column index at each sweep position."""
    cols = hessian.shape[0]
    if not act_order:
        return torch.arange(cols)
    # Stable, so tied diagonals (e.g. dead inputs, all 0 and hence last) keep a reproducible order.
    return torch.argsort(hessian.diagonal().cpu(), descending=True, stable=True)


@torch.no_grad()
def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, cfg: GPTQConfig = GPTQConfig()) -> torch.Tensor:
    """The GPTQ-quantized, dequantized weight [out, in] (weight's dtype); `weight` itself is not modified."""
    rows, cols = weight.shape
    group = group_width(cols, cfg.group_size)
    order = sweep_order(hessian, cfg.act_order)
    # Everything below works in sweep coordinates: position p holds original column order[p].
    u64, dead = inverse_hessian_factor(hessian[order][:, order], cfg.percdamp)
    device = weight.device
    u = u64.float().to(device)
    w = weight.detach().float()[:, order.to(device)].clone()
    w[:, dead.to(device)] = 0  # an input that is always 0 carries no signal (as the reference does)

    group_at = (order // group).tolist()  # group (of original columns) of each sweep position
    position_of = torch.empty_like(order)
    position_of[order] = torch.arange(cols)
    members = position_of.reshape(-1, group).to(device)  # sweep positions of each group's columns
    entered = [False] * (cols // group)
    scales = torch.empty(rows, cols // group, device=device)

    for start in range(0, cols, cfg.blocksize):
        end = min(start + cfg.blocksize, cols)
        block, u_block = w[:, start:end], u[start:end, start:end]  # a view: updates land in w
        errors = torch.zeros_like(block)
        for j in range(end - start):
            k = group_at[start + j]
            if not entered[k]:
                entered[k] = True
                scales[:, k] = symmetric_scale(_current(w, members[k], errors, u, start, end), cfg.bits)
            column = block[:, j]
            q = round_to_grid(column, scales[:, k], cfg.bits)
            err = (column - q) / u_block[j, j]
            block[:, j + 1 :] -= err.unsqueeze(1) * u_block[j, j + 1 :].unsqueeze(0)
            # The update would take column j to q up to float error; store q exactly so it is on the grid.
            block[:, j] = q
            errors[:, j] = err
        # Lazy batch update: the block's accumulated errors reach the later columns in one matmul.
        w[:, end:] -= errors @ u[start:end, end:]

    out = torch.empty_like(w)
    out[:, order.to(device)] = w
    return out.to(weight.dtype)


def _current(w, positions, errors, u, start, end) -> torch.Tensor:
    """The weights at `positions` (all not yet quantized) with every error so far applied.

    Inside the current block `w` is up to date; beyond it, this block's errors are still pending
    (the lazy update), so they are applied here. Errors of columns not yet reached are 0.
    """
    values = w[:, positions].clone()
    later = positions >= end
    if later.any():
        values[:, later] -= errors @ u[start:end, positions[later]]
    return values


def check_group_fits(model: nn.Module, group_size: int | None) -> None:
    """Fail before any calibration pass if a decoder linear's width is not a multiple of the group."""
    for index, block in enumerate(decoder_layers(model)):
        for name, linear in block_linears(block).items():
            if group_size is not None and linear.in_features % group_size:
                raise UserError(
                    f"group size {group_size} does not divide input width {linear.in_features} of {block_prefix(model, index)}{name}"
                )


def quantize_gptq(model: nn.Module, calibration: Calibration, cfg: GPTQConfig = GPTQConfig()) -> None:
    """Block-sequential GPTQ of every decoder linear layer, in place (stored dequantized)."""
    check_group_fits(model, cfg.group_size)

    def quantize(name, linear, hessian: Hessian):
        linear.weight.copy_(gptq_quantize(linear.weight, hessian.matrix(), cfg))

    group = "row" if cfg.group_size is None else cfg.group_size
    compress_blockwise(model, calibration, Hessian, quantize, desc=f"GPTQ int{cfg.bits} g{group}")

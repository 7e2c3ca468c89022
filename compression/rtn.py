"""Round-to-nearest weight quantization baseline: symmetric, group-wise along the input dimension.

Stored dequantized (the float weights equal scale * integer code), so a quantized variant is a
plain float checkpoint that every analysis can load; the manifest records bits and group size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lm.errors import UserError
from lm.hooks import decoder_layers

from .blockwise import block_linears


@dataclass(frozen=True)
class QuantConfig:
    bits: int = 8
    group_size: int | None = 128  # None: one scale per output row

    def __post_init__(self):
        if not 2 <= self.bits <= 8:
            raise UserError(f"quantization bits must be in 2..8, got {self.bits}")
        if self.group_size is not None and self.group_size <= 0:
            raise UserError(f"group size must be positive, got {self.group_size}")


def quantize_rtn(weight: torch.Tensor, bits: int, group_size: int | None) -> torch.Tensor:
    """Dequantized symmetric RTN of a [out, in] matrix; max error per weight is scale / 2."""
    rows, cols = weight.shape
    group = cols if group_size is None else group_size
    if cols % group:
        raise UserError(f"group size {group} does not divide input width {cols}")
    w = weight.float().reshape(rows, cols // group, group)
    qmax = 2 ** (bits - 1) - 1
    scale = w.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / qmax
    codes = torch.clamp(torch.round(w / scale), -qmax - 1, qmax)
    return (codes * scale).reshape(rows, cols).to(weight.dtype)


@torch.no_grad()
def quantize_model_rtn(model: nn.Module, cfg: QuantConfig) -> None:
    for block in decoder_layers(model):
        for linear in block_linears(block).values():
            linear.weight.copy_(quantize_rtn(linear.weight, cfg.bits, cfg.group_size))

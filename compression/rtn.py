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


def grid_codes(
    weight: torch.Tensor, bits: int, group_size: int | None, rtol: float = 1e-4
) -> tuple[torch.Tensor, torch.Tensor]:
    """(integer codes [out, in], scales [out, groups]) of a matrix that lies on the symmetric grid
    (an RTN or GPTQ variant's dequantized weight), so that weight = codes * scale of its group.

    A group's values are c_i * s with codes in [-2^(b-1), 2^(b-1) - 1]. Its largest |value| is
    s * k for some k in 1..2^(b-1); the largest s (smallest k) for which every value divides into an
    integer code is the group's scale (a smaller one would fit too, with codes out of range or
    needlessly coarse). A matrix off the grid (not quantized at these bits and group) is a UserError."""
    rows, cols = weight.shape
    group = cols if group_size is None else group_size
    if cols % group:
        raise UserError(f"group size {group} does not divide input width {cols}")
    w = weight.detach().double().reshape(rows, cols // group, group)
    peak = w.abs().amax(dim=-1)
    scales = torch.zeros_like(peak)
    codes = torch.zeros_like(w)
    found = peak == 0  # an all-zero group: any scale, codes 0
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    for k in range(1, 2 ** (bits - 1) + 1):
        s = peak / k
        c = torch.round(w / s.clamp_min(1e-300).unsqueeze(-1))
        fits = (
            ((w - c * s.unsqueeze(-1)).abs() <= rtol * peak.unsqueeze(-1)).all(-1)
            & (c >= lo).all(-1)
            & (c <= hi).all(-1)
            & ~found
        )
        scales[fits], codes[fits] = s[fits], c[fits]
        found |= fits
    if not bool(found.all()):
        row, g = (~found).nonzero()[0].tolist()
        raise UserError(
            f"the weight is not on a {bits}-bit grid with group size {group} (row {row}, group {g}): not a quantized variant at these settings"
        )
    scales[peak == 0] = 1.0
    return codes.reshape(rows, cols).to(torch.int32), scales.float()

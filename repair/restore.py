"""Copying original weights back into a compressed model: one whole block, or chosen entries.

Restoration works on parameters by name so that it is indifferent to how the compressed model
was made (pruned zeros come back; a quantized block returns to its original values).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from lm.architecture import block_prefix


def block_params(model: nn.Module, layer: int) -> dict[str, nn.Parameter]:
    prefix = block_prefix(model, layer)
    return {n: p for n, p in model.named_parameters() if n.startswith(prefix)}


@torch.no_grad()
def restore_entries(compressed: nn.Module, original: nn.Module, masks: dict[str, torch.Tensor]) -> int:
    """Set compressed[name][mask] = original[name][mask] for every named mask; returns entries changed."""
    c_params, o_params = dict(compressed.named_parameters()), dict(original.named_parameters())
    changed = 0
    for name, mask in masks.items():
        c = c_params[name]
        o = o_params[name].to(c.device, c.dtype)
        mask = mask.to(c.device)
        changed += int((c[mask] != o[mask]).sum())
        c[mask] = o[mask]
    return changed


def block_masks(compressed: nn.Module, original: nn.Module, layer: int) -> dict[str, torch.Tensor]:
    """Where block `layer` of the compressed model differs from the original: the entries AIRD restores."""
    o_params = dict(original.named_parameters())
    return {
        n: (p.detach() != o_params[n].detach().to(p.device, p.dtype))
        for n, p in block_params(compressed, layer).items()
    }


@contextmanager
def restored(compressed: nn.Module, original: nn.Module, masks: dict[str, torch.Tensor]):
    """Temporarily restore the masked entries (for scoring a candidate); always undone on exit."""
    c_params = dict(compressed.named_parameters())
    saved = {n: c_params[n].detach()[m.to(c_params[n].device)].clone() for n, m in masks.items()}
    restore_entries(compressed, original, masks)
    try:
        yield compressed
    finally:
        with torch.no_grad():
            for n, m in masks.items():
                c_params[n][m.to(c_params[n].device)] = saved[n]


def count(masks: dict[str, torch.Tensor]) -> int:
    return int(sum(int(m.sum()) for m in masks.values()))

"""Gradients for a chosen set of parameters only, everything else frozen for the duration."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def gradients_only_for(model: nn.Module, params: list[nn.Parameter]):
    """Eval mode, and requires_grad on `params` alone; flags and mode are restored on exit.

    Scores that need dL/dW of a few matrices (SNIP, targeted restoration) would otherwise pay for
    gradients of every parameter, and a caller's own requires_grad flags must survive the scoring.
    """
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    try:
        model.eval()
        for p, _ in flags:
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        with torch.enable_grad():
            yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)

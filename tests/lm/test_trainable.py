"""Restricting gradients to chosen parameters (lm.trainable)."""

from __future__ import annotations

import torch


def test_gradients_only_for_freezes_the_rest_and_restores_flags_and_mode():
    from lm.trainable import gradients_only_for

    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Dropout(0.5), torch.nn.Linear(3, 1))
    model.train()
    model[2].bias.requires_grad_(False)  # a caller's own frozen flag must survive
    with torch.no_grad(), gradients_only_for(model, [model[0].weight]):
        assert not model.training
        model(torch.ones(2, 3)).sum().backward()
    assert model[0].weight.grad is not None
    assert all(p.grad is None for p in (model[0].bias, model[2].weight, model[2].bias))
    assert model.training and [p.requires_grad for p in model.parameters()] == [True, True, True, False]

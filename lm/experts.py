"""Mixture-of-experts blocks seen as one set of nn.Linear layers per expert.

Transformers 5 keeps a block's experts as 3-D tensors (gate_up_proj [E, 2I, H] and down_proj
[E, H, I], or each transposed) run by one batched kernel; its experts modules describe the layout
(has_gate, has_bias, is_transposed, _apply_gate). The stages that read nn.Linear layers (every
compression method, orthogonalization) collect each linear's inputs, gradients or weight, so
inside `experts_as_linears` each expert's projections are nn.Linear modules named
`<experts>.{e}.gate_up_proj` / `.down_proj` (the per-expert names of Hub checkpoints), whose
weights are views of the fused tensors, and the experts run as a loop that gives each expert
exactly the tokens routed to it. Routers are not among these linears: they stay as they are.

A linear inside sees only its routed tokens, as a [tokens, features] matrix; `token_mask` and
`token_grid` relate those rows to the block's [batch, seq] positions.
"""

from __future__ import annotations

import types
from contextlib import ExitStack, contextmanager
from typing import Callable

import torch
from torch import nn

from .errors import UserError

ROUTED = "_routed_tokens"  # attribute set on an expert linear during a forward pass: its rows' flat token indices


def is_fused_experts(module: nn.Module) -> bool:
    """A transformers experts module (its weights in 3-D tensors, its layout in attributes)."""
    return (
        hasattr(module, "has_gate")
        and hasattr(module, "is_transposed")
        and isinstance(getattr(module, "down_proj", None), nn.Parameter)
    )


def _up_name(experts: nn.Module) -> str:
    return "gate_up_proj" if experts.has_gate else "up_proj"


def expert_matrix(experts: nn.Module, name: str, index: int) -> torch.Tensor:
    """Expert `index`'s weight of projection `name` as an [out, in] view of the fused tensor."""
    fused = getattr(experts, name).data[index]
    return fused.t() if experts.is_transposed else fused


def _linear(experts: nn.Module, name: str, index: int) -> nn.Linear:
    weight = expert_matrix(experts, name, index)
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=getattr(experts, name).requires_grad)
    bias = getattr(experts, f"{name}_bias", None) if getattr(experts, "has_bias", False) else None
    if bias is not None:
        linear.bias = nn.Parameter(bias.data[index], requires_grad=bias.requires_grad)
    return linear


def _routed(linear: nn.Linear, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    setattr(linear, ROUTED, tokens)
    return linear(x)


def _looped_forward(
    self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """The experts' output, one expert at a time through its nn.Linear modules."""
    out = torch.zeros_like(hidden_states)
    up_name = _up_name(self)
    for index in range(self.num_experts):
        tokens, slot = torch.where(top_k_index == index)
        if tokens.numel() == 0:
            continue
        expert = self._modules[str(index)]
        h = _routed(getattr(expert, up_name), hidden_states[tokens], tokens)
        h = self._apply_gate(h) if self.has_gate else self.act_fn(h)
        h = _routed(expert.down_proj, h, tokens)
        if getattr(self, "has_post_expert_norm", False):
            h = self.post_expert_norm(h)
        out.index_add_(0, tokens, (h * top_k_weights[tokens, slot, None]).to(out.dtype))
    return out


@contextmanager
def _one_as_linears(experts: nn.Module):
    up_name = _up_name(experts)
    for name in (up_name, "down_proj"):
        if getattr(experts, name).dim() != 3:
            raise UserError(f"{type(experts).__name__}.{name} is not a 3-D [experts, out, in] tensor")
    per_expert = []
    for index in range(experts.num_experts):
        expert = nn.Module()
        expert.add_module(up_name, _linear(experts, up_name, index))
        expert.add_module("down_proj", _linear(experts, "down_proj", index))
        experts.add_module(str(index), expert)
        per_expert.append(expert)
    experts.forward = types.MethodType(_looped_forward, experts)
    try:
        yield
    finally:
        del experts.forward
        for index, expert in enumerate(per_expert):
            del experts._modules[str(index)]
            for name in (up_name, "down_proj"):
                # A method that rebinds a weight instead of editing it in place leaves the view: copy back.
                target, weight = expert_matrix(experts, name, index), getattr(expert, name).weight
                if weight.data_ptr() != target.data_ptr() or weight.device != target.device:
                    target.copy_(weight.detach().to(target.device, target.dtype))


@contextmanager
def experts_as_linears(*models: nn.Module):
    """Within: every fused experts module of `models` runs as per-expert nn.Linear modules (see the
    module docstring); on exit the modules are gone and the fused tensors hold their weights."""
    with ExitStack() as stack:
        for model in models:
            for module in list(model.modules()):
                if is_fused_experts(module):
                    stack.enter_context(_one_as_linears(module))
        yield models[0] if len(models) == 1 else models


def expert_linears(experts: nn.Module, name: str) -> list[nn.Linear]:
    """Each expert's linear `name` (e.g. 'down_proj'), inside experts_as_linears."""
    if not is_fused_experts(experts) or "0" not in experts._modules:
        raise UserError(
            f"{type(experts).__name__} has no per-expert linears here (only inside lm.experts.experts_as_linears)"
        )
    return [getattr(experts._modules[str(i)], name) for i in range(experts.num_experts)]


def token_mask(linear: nn.Module, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Which rows of `x`, `linear`'s latest input, are real tokens, given the block's [batch, seq]
    token mask: an expert sees its routed tokens, and MoE blocks hand even their dense linears
    (a shared expert) the tokens flattened."""
    tokens = getattr(linear, ROUTED, None)
    if tokens is not None:
        return mask.reshape(-1)[tokens.to(mask.device)]
    return mask if x.shape[:-1] == mask.shape else mask.reshape(x.shape[:-1])


def token_grid(linear: nn.Module, shape: tuple[int, int]) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function placing rows of `linear`'s latest forward (its input, or its output's gradient)
    on the [batch, seq, features] grid of `shape`: a dense linear's as they are (unflattened);
    an expert's routed rows scattered back, zero at other tokens. Call it in the forward hook:
    the routing is read then."""
    tokens = getattr(linear, ROUTED, None)
    if tokens is None:
        return lambda x: x.view(*shape, x.shape[-1])

    def place(x: torch.Tensor) -> torch.Tensor:
        grid = x.new_zeros(shape[0] * shape[1], x.shape[-1])
        grid[tokens.to(x.device)] = x
        return grid.view(*shape, x.shape[-1])

    return place

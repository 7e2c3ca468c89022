"""Residual-stream access with plain torch hooks on Hugging Face decoder blocks.

Conventions (TransformerLens names): `resid_pre[l]` is the input of decoder block l (so
`resid_pre[0]` is the embedding output and equals `hidden_states[l]` of `output_hidden_states`),
`attn_out[l]` / `mlp_out[l]` are what block l's attention and MLP add to the stream.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable

import torch
from torch import nn

from .architecture import backbone, decoder_layers, residual_contributions

__all__ = [
    "block_input",
    "block_output",
    "capture",
    "decoder_layers",
    "foreign_hooks",
    "hooks_registered",
    "intervene",
    "project_out",
    "StopForward",
]


def block_output(output):
    """The hidden states a decoder block returns (blocks return a tuple in some families)."""
    return output[0] if isinstance(output, tuple) else output


def _replace_first(output, new):
    return (new, *output[1:]) if isinstance(output, tuple) else new


def block_input(args, kwargs):
    """The hidden states a decoder block receives, from a forward pre-hook's (args, kwargs)."""
    return args[0] if args else kwargs["hidden_states"]


def _pre_hook_replace(args, kwargs, new):
    if args:
        return (new, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": new}


class StopForward(Exception):
    """Raised by a hook to end a forward pass once it has what it needs (lm.partial_forward)."""


@contextmanager
def hooks_registered(handles: list):
    """Remove every hook handle on exit, including when the body raises."""
    try:
        yield handles
    finally:
        for handle in handles:
            handle.remove()
        handles.clear()


def foreign_hooks(model: nn.Module) -> list:
    """Forward (pre-)hooks on the model's modules, less transformers' own output capturing.

    transformers installs recording hooks the first time hidden states or attentions are asked
    for and keeps them; they never change an output. Anything else (an ablation, a capture left
    behind) may, or is a leak.
    """
    return [
        h
        for m in model.modules()
        for h in (*m._forward_hooks.values(), *m._forward_pre_hooks.values())
        if not getattr(h, "__module__", "").startswith("transformers.")
    ]


@torch.no_grad()
def capture(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    positions: Iterable[int],
    layers: Iterable[int] | None = None,
    sites: Iterable[str] = ("resid_pre",),
    forward_kwargs: dict | None = None,
) -> dict[str, torch.Tensor]:
    """Activations at `positions` (indices into the sequence, negative counts from the end).

    Returns {site: tensor [batch, n_positions, n_layers, d_model]} in float32. The forward pass
    stops right after the last block it needs, so capturing early layers skips the rest of the
    model and the LM head (this is what makes direction extraction cheap). `forward_kwargs` go
    to the model's forward as well (e.g. position ids and a KV cache from lm.prefix).
    """
    blocks = decoder_layers(model)
    layers = list(range(len(blocks))) if layers is None else sorted(set(layers))
    sites = tuple(sites)
    unknown = set(sites) - {"resid_pre", "attn_out", "mlp_out"}
    if unknown:
        raise ValueError(f"unknown sites {sorted(unknown)}")
    pos = torch.as_tensor(list(positions), dtype=torch.long)
    store: dict[str, dict[int, torch.Tensor]] = {site: {} for site in sites}
    last_layer = layers[-1]
    needs_outputs = any(s != "resid_pre" for s in sites)

    def take(x):
        return x[:, pos.to(x.device)].float().cpu()

    handles = []
    for layer in layers:
        block = blocks[layer]
        attn, mlp = residual_contributions(model, block)
        if "resid_pre" in sites:

            def pre(module, args, kwargs, layer=layer):
                store["resid_pre"][layer] = take(block_input(args, kwargs))
                if layer == last_layer and not needs_outputs:
                    raise StopForward

            handles.append(block.register_forward_pre_hook(pre, with_kwargs=True))
        if "attn_out" in sites:
            handles.append(
                attn.register_forward_hook(
                    lambda m, a, out, layer=layer: store["attn_out"].__setitem__(layer, take(block_output(out)))
                )
            )
        if "mlp_out" in sites:
            handles.append(
                mlp.register_forward_hook(
                    lambda m, a, out, layer=layer: store["mlp_out"].__setitem__(layer, take(block_output(out)))
                )
            )
        if needs_outputs and layer == last_layer:

            def post(module, args, output):
                raise StopForward

            handles.append(block.register_forward_hook(post))
    with hooks_registered(handles):
        try:
            backbone(model)(
                **{
                    "input_ids": input_ids,
                    "attention_mask": attention_mask,
                    "use_cache": False,
                    **(forward_kwargs or {}),
                }
            )
        except StopForward:
            pass
    return {site: torch.stack([store[site][l] for l in layers], dim=2) for site in sites}


def _per_row(vector: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A [d] vector as is; a [batch, d] stack reshaped to broadcast over x's middle dimensions."""
    vector = vector.to(x.dtype).to(x.device)
    if vector.dim() == 1:
        return vector
    return vector.view(vector.shape[0], *([1] * (x.dim() - 2)), vector.shape[-1])


def project_out(x: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """x minus its component along `direction` (normalised here), along the last dimension.

    `direction` is [d] (one direction for everything) or [batch, d] (row b of x uses direction b),
    which lets one forward pass ablate a different candidate direction in each row.
    """
    unit = direction / direction.norm(dim=-1, keepdim=True)
    if unit.dim() == 1:
        unit = unit.to(x.dtype).to(x.device)
        return x - (x @ unit).unsqueeze(-1) * unit
    # A batched matmul (not multiply-and-sum) keeps the dot products' accumulation as precise
    # as the single-direction path in half precision.
    unit = unit.to(x.dtype).to(x.device)
    rows = x.reshape(x.shape[0], -1, x.shape[-1])
    coef = torch.bmm(rows, unit.unsqueeze(-1))
    return x - (coef * unit.unsqueeze(1)).view_as(x)


@contextmanager
def intervene(
    model: nn.Module,
    ablate: torch.Tensor | None = None,
    add: dict[int, torch.Tensor] | None = None,
):
    """Directional ablation and/or activation addition for the duration of the block.

    ablate: a direction projected out of every block input and every attention and MLP output,
    at all layers and positions (Arditi et al.'s directional ablation).
    add: {layer: vector} added to that block's input at every position (activation addition;
    scale the vector for a coefficient). Hooks are always removed, even if the body raises.
    Either may also be given per batch row, as [batch, d] (a zero row leaves that row unchanged
    under `add`), so several candidate directions can share one forward pass.
    """
    blocks = decoder_layers(model)
    handles = []
    add = add or {}
    for index, block in enumerate(blocks):
        attn, mlp = residual_contributions(model, block)
        vector = add.get(index)
        if ablate is not None or vector is not None:

            def pre(module, args, kwargs, vector=vector):
                h = block_input(args, kwargs)
                if vector is not None:
                    h = h + _per_row(vector, h)
                if ablate is not None:
                    h = project_out(h, ablate)
                return _pre_hook_replace(args, kwargs, h)

            handles.append(block.register_forward_pre_hook(pre, with_kwargs=True))
        if ablate is not None:

            def post(module, args, output):
                return _replace_first(output, project_out(block_output(output), ablate))

            handles.append(attn.register_forward_hook(post))
            handles.append(mlp.register_forward_hook(post))
    with hooks_registered(handles):
        yield model

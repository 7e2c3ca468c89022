"""Bring one module's weights onto a compute device for a while, wherever they normally live.

A model loaded with accelerate's `device_map` (lm.loading.load_model(..., device_map="auto"))
spreads its decoder blocks over several GPUs, the CPU, or disk; offloaded weights sit on the
"meta" device and accelerate's hooks load them for each forward call and drop them afterwards,
so an in-place edit of such a weight (pruning) would be lost. `resident` makes a module
self-contained on one device for the duration of a with-block: every parameter and buffer is
materialised there (offloaded ones read from the hook's weight map), accelerate's hooks inside
the module are switched off, and on exit the (possibly edited) tensors go back to where they came
from: to their original device, or, for offloaded ones, into the hook's weight map (in place for
CPU offload; accelerate's disk copies are read-only, so a disk-offloaded module that was edited
keeps its weights in CPU memory from then on).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


def _hook_of(module: nn.Module):
    return getattr(module, "_hf_hook", None)


def has_dispatch_hooks(model: nn.Module) -> bool:
    return any(_hook_of(m) is not None for m in model.modules())


def compute_device(model: nn.Module) -> torch.device:
    """Where block-by-block work runs: the first GPU when there is one and the model uses a
    device map, else the device of the model's first materialised parameter."""
    devices = {p.device for p in model.parameters() if p.device.type != "meta"}
    if torch.cuda.is_available() and (has_dispatch_hooks(model) or any(d.type == "cuda" for d in devices)):
        cuda = sorted((d for d in devices if d.type == "cuda"), key=lambda d: d.index or 0)
        return cuda[0] if cuda else torch.device("cuda", 0)
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def _set(module: nn.Module, name: str, value: torch.Tensor, is_param: bool) -> None:
    if is_param:
        old = module._parameters[name]
        module._parameters[name] = nn.Parameter(value, requires_grad=old.requires_grad)
    else:
        module._buffers[name] = value


def _store_offloaded(sub: nn.Module, hook, name: str, value: torch.Tensor, homes: list) -> None:
    """Write an edited offloaded tensor back so the module's next forward loads it."""
    stored = hook.weights_map[name]
    if stored.data_ptr() != value.data_ptr():
        stored.copy_(value)
    # CPU offload keeps one tensor per weight in memory: the copy above is the edit, in place.
    if hook.weights_map[name].data_ptr() == stored.data_ptr():
        return
    # Disk offload hands out a fresh copy per lookup (the files are read-only): this module gets a
    # plain dict in CPU memory instead, holding its edited and unedited tensors.
    if not isinstance(hook.weights_map, dict):
        names = [n for s, n, _, _, h in homes if s is sub and h is not None]
        hook.weights_map = {n: hook.weights_map[n] for n in names}
    hook.weights_map[name] = value.to("cpu")


@contextmanager
def resident(module: nn.Module, device: torch.device | str):
    """`module`'s parameters and buffers on `device`, its dispatch hooks off, for the duration."""
    from accelerate.hooks import ModelHook

    device = torch.device(device)
    homes = []  # (submodule, name, is_param, original device, offload hook or None)
    hooks = {}
    for sub in module.modules():
        hook = _hook_of(sub)
        if hook is not None:
            hooks[sub] = hook
        weights_map = getattr(hook, "weights_map", None) if getattr(hook, "offload", False) else None
        tensors = [(n, t, True) for n, t in sub._parameters.items() if t is not None]
        tensors += [(n, t, False) for n, t in sub._buffers.items() if t is not None]
        for name, tensor, is_param in tensors:
            offloaded = tensor.device.type == "meta" and weights_map is not None
            homes.append((sub, name, is_param, tensor.device, hook if offloaded else None))
            if offloaded:
                value = weights_map[name].to(device=device, dtype=tensor.dtype)
            elif tensor.device != device:
                value = tensor.data.to(device)
            else:
                continue
            _set(sub, name, value, is_param)
    for sub in hooks:
        sub._hf_hook = ModelHook()  # accelerate's forward wrapper calls whatever hook is attached
    try:
        yield module
    finally:
        for sub, hook in hooks.items():
            sub._hf_hook = hook
        for sub, name, is_param, home, hook in homes:
            tensor = sub._parameters[name] if is_param else sub._buffers[name]
            if hook is not None:
                _store_offloaded(sub, hook, name, tensor.data, homes)
                _set(sub, name, torch.empty_like(tensor, device="meta"), is_param)
            elif tensor.device != home:
                _set(sub, name, tensor.data.to(home), is_param)

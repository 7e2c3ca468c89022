"""Block-sequential compression (the Wanda / SparseGPT recipe).

Calibration inputs are run up to decoder block 0 once. Then, block by block: collect statistics of
the inputs of every linear layer in the block, compress the block, and recompute the block's
outputs with its compressed weights; those outputs are the next block's inputs. Only one block's
activations for the calibration set are alive at a time.

Models loaded with a device map (blocks on several GPUs, or offloaded to CPU or disk; see the
README's "Scale" section) are handled one block at a time too: the block's weights are brought
onto the compute device (lm.placement.resident), worked on there with the activations, and put
back where they live, so the compute device holds one block plus one block's activations.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from lm.architecture import block_linears, block_prefix
from lm.errors import UserError
from lm.experts import token_mask
from lm.hooks import block_output, decoder_layers, hooks_registered
from lm.partial_forward import block0_input, uniform_layers
from lm.placement import compute_device, resident

from .calibration import Calibration


class Collector(Protocol):
    def add(self, x: torch.Tensor) -> None:
        """x: [tokens, in_features] float32 inputs of one linear layer, padding removed."""


@torch.no_grad()
def block0_inputs(model: nn.Module, calibration: Calibration) -> list[tuple[torch.Tensor, dict, torch.Tensor]]:
    """(hidden_states, keyword arguments, token mask) entering block 0, one triple per batch.

    Every block is then run with block 0's keyword arguments. Where layers take different masks
    (Gemma 2's sliding-window and global layers) those are the same only while a sequence fits
    the window, which is checked here.
    """
    device = compute_device(model)
    if not uniform_layers(model):
        window = getattr(model.config.get_text_config(), "sliding_window", None)
        longest = max(int(b["input_ids"].shape[1]) for b in calibration.batches)
        if window is None or longest > window:
            raise UserError(
                f"this model's layers use different attention masks; block-by-block compression needs calibration "
                f"sequences within its sliding window ({window} tokens), got {longest}"
            )
    states = []
    for batch in calibration.batches:
        mask = batch["attention_mask"].to(device)
        hidden, kwargs = block0_input(model, batch["input_ids"].to(device), mask)
        states.append((hidden, kwargs, mask.bool()))
    return states


@torch.no_grad()
def run_block(block: nn.Module, states) -> list:
    return [(block_output(block(hidden, **kwargs)), kwargs, mask) for hidden, kwargs, mask in states]


@torch.no_grad()
def collect(block: nn.Module, states, make_collector: Callable[[nn.Linear], Collector]) -> dict[str, Collector]:
    """Run the block on every batch and feed each linear's (unpadded) inputs to its collector.

    An expert the router sent no calibration token gets the rows of the identity instead: with
    no data every input feature counts the same, so Wanda falls back to magnitude and GPTQ /
    SparseGPT to an identity Hessian, rather than ranking by nothing or zeroing the expert.
    """
    linears = block_linears(block)
    collectors = {name: make_collector(lin) for name, lin in linears.items()}
    current_mask, rows = {}, dict.fromkeys(linears, 0)

    def hook(name):
        def fn(module, args, output):
            x = args[0][token_mask(module, args[0], current_mask["m"])]
            collectors[name].add(x.reshape(-1, x.shape[-1]).float())
            rows[name] += x.reshape(-1, x.shape[-1]).shape[0]

        return fn

    with hooks_registered([lin.register_forward_hook(hook(name)) for name, lin in linears.items()]):
        for hidden, kwargs, mask in states:
            current_mask["m"] = mask
            block(hidden, **kwargs)
    unreached = [name for name, n in rows.items() if n == 0]
    for name in unreached:
        width, device = linears[name].in_features, linears[name].weight.device
        for start in range(0, width, 1024):  # the identity in slabs: a 14k-wide expert would need 0.8 GB at once
            slab = torch.zeros(min(1024, width - start), width, device=device)
            slab[:, start : start + slab.shape[0]].fill_diagonal_(1.0)
            collectors[name].add(slab)
    if unreached:
        tqdm.write(
            f"note: {len(unreached)} linear(s) of this block got no calibration token ({unreached[0]}, ...); "
            "compressed as if every input feature mattered equally"
        )
    return collectors


def _to(obj, device: torch.device):
    """Tensors inside nested tuples / lists / dicts moved to `device` (other values as they are)."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(x, device) for x in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


@torch.no_grad()
def compress_blockwise(
    model: nn.Module,
    calibration: Calibration,
    make_collector: Callable[[nn.Linear], Collector],
    compress_linear: Callable[[str, nn.Linear, Collector], None],
    desc: str = "compress",
    device: torch.device | str | None = None,
) -> None:
    """Apply `compress_linear` to every linear of every block, block-sequentially, in place.

    device: where each block is worked on (default: lm.placement.compute_device, the first GPU
    for a device-mapped model, else the model's device).
    """
    device = compute_device(model) if device is None else torch.device(device)
    states = _to(block0_inputs(model, calibration), device)
    for index, block in enumerate(tqdm(decoder_layers(model), desc=desc, unit="block", leave=False)):
        with resident(block, device):
            collectors = collect(block, states, make_collector)
            prefix = block_prefix(model, index)
            for name, lin in block_linears(block).items():
                compress_linear(prefix + name, lin, collectors[name])
            states = run_block(block, states)

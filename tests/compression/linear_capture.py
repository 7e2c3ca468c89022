"""Brute-force reference for attribution tests: every decoder linear's inputs from one plain forward
pass of the whole model (no block-by-block streaming), at the positions a mask selects."""

from __future__ import annotations

import torch

from lm.architecture import decoder_linears
from lm.hooks import hooks_registered


@torch.no_grad()
def linear_inputs(model, batches, positions=lambda batch: batch["attention_mask"].bool()) -> dict[str, torch.Tensor]:
    """{'model.layers.{i}.{name}.weight': X [tokens, in] float64} over all batches."""
    linears = decoder_linears(model)
    rows: dict[str, list] = {name: [] for name in linears}
    current = {}

    def hook(name):
        def fn(module, args, output):
            rows[name].append(args[0][current["mask"]].double())

        return fn

    with hooks_registered([lin.register_forward_hook(hook(name)) for name, lin in linears.items()]):
        for batch in batches:
            current["mask"] = positions(batch)
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    return {name: torch.cat(r) for name, r in rows.items()}


def response_positions(batch) -> torch.Tensor:
    return batch["labels"] != -100

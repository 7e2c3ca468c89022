"""Wikitext-2 perplexity on non-overlapping windows (the Wanda/SparseGPT protocol, fewer windows)."""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from .datasets import wikitext2_test
from .errors import UserError


@torch.no_grad()
def perplexity(model, tokenizer, n_windows: int = 16, seqlen: int = 512, text: str | None = None, batch_size: int = 4) -> float:
    """exp(mean next-token NLL) over the first `n_windows` windows of `seqlen` tokens."""
    text = wikitext2_test() if text is None else text
    ids = tokenizer(text[: n_windows * seqlen * 12], return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    available = ids.numel() // seqlen
    if available == 0 or n_windows <= 0:
        raise UserError(f"perplexity text too short for one window of {seqlen} tokens")
    n = min(n_windows, available)
    windows = ids[: n * seqlen].view(n, seqlen)
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for start in tqdm(range(0, n, batch_size), desc="perplexity", unit="batch", leave=False):
        batch = windows[start : start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits.float()
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        nll += loss.item()
        count += batch[:, 1:].numel()
    return math.exp(nll / count)

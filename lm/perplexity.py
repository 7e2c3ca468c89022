"""Wikitext-2 perplexity on non-overlapping windows (the Wanda/SparseGPT protocol, fewer windows)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .datasets import WIKITEXT_CALIBRATION_FROM, wikitext2_test
from .errors import UserError

# Characters read per window token: ample (wikitext-2 averages ~4.4 per token), and it bounds
# how far into the text an evaluation can reach.
CHARS_PER_TOKEN_BOUND = 12


def check_disjoint_from_calibration(n_windows: int, seqlen: int) -> None:
    """Fail if perplexity windows could reach the text that wikitext calibration uses."""
    if n_windows * seqlen * CHARS_PER_TOKEN_BOUND > WIKITEXT_CALIBRATION_FROM:
        limit = WIKITEXT_CALIBRATION_FROM // CHARS_PER_TOKEN_BOUND
        raise UserError(
            f"perplexity on {n_windows} x {seqlen} tokens could overlap the wikitext-2 calibration text; "
            f"keep windows x seqlen <= {limit} with wikitext calibration"
        )


@dataclass(frozen=True)
class PerplexityConfig:
    windows: int = 8
    seqlen: int = 512
    batch_size: int = 4


@torch.no_grad()
def window_nll(
    model, tokenizer, n_windows: int = 16, seqlen: int = 512, text: str | None = None, batch_size: int = 4
) -> dict:
    """Per-window summed next-token NLL and scored-token count over the first `n_windows` windows.

    Kept per window so the perplexity can carry a bootstrap interval over windows.
    """
    if n_windows <= 0 or seqlen <= 1:
        raise UserError(f"perplexity needs at least one window of at least 2 tokens, got {n_windows} x {seqlen}")
    text = wikitext2_test() if text is None else text
    ids = tokenizer(text[: n_windows * seqlen * CHARS_PER_TOKEN_BOUND], return_tensors="pt", add_special_tokens=False)[
        "input_ids"
    ][0]
    available = ids.numel() // seqlen
    if available == 0:
        raise UserError(f"perplexity text too short for one window of {seqlen} tokens")
    n = min(n_windows, available)
    windows = ids[: n * seqlen].view(n, seqlen)
    device = next(model.parameters()).device
    nll, tokens = [], []
    for start in tqdm(range(0, n, batch_size), desc="perplexity", unit="batch", leave=False):
        batch = windows[start : start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits.float()
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="none"
        ).view(batch.shape[0], -1)
        nll.extend(float(x) for x in loss.double().sum(dim=1))
        tokens.extend([seqlen - 1] * batch.shape[0])
    return dict(nll=nll, tokens=tokens)


def perplexity(
    model, tokenizer, n_windows: int = 16, seqlen: int = 512, text: str | None = None, batch_size: int = 4
) -> float:
    """exp(mean next-token NLL) over the first `n_windows` windows of `seqlen` tokens."""
    w = window_nll(model, tokenizer, n_windows, seqlen, text, batch_size)
    return math.exp(sum(w["nll"]) / sum(w["tokens"]))


def measure_perplexity(model, tokenizer, cfg: PerplexityConfig) -> dict:
    """The stored perplexity measurement: the value and every window's NLL (for its interval)."""
    w = window_nll(model, tokenizer, cfg.windows, cfg.seqlen, batch_size=cfg.batch_size)
    return dict(perplexity=math.exp(sum(w["nll"]) / sum(w["tokens"])), window_nll=w["nll"], window_tokens=w["tokens"])

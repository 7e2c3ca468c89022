"""Continuous batching: a decode loop that keeps its batch full by admitting waiting prompts as
rows finish.

Why: in an ASR run most completions are short refusals (~12 tokens) and a few run to the token
limit. With fixed batches the tail of every batch decodes a handful of rows while each step still
reads all the weights, so batching bought only ~4x over one prompt at a time on the embedded
model. Here a row leaves the KV cache as soon as it produces an end-of-turn token, and once a
quarter of the slots are free the next waiting prompts are prefilled (only their own tokens: the
chat template's shared prefix is run once for the whole call) and joined to the running batch.
Their caches are left-padded to the running width and concatenated along the batch; the attention
mask hides the padding and position ids count only real tokens, so each row sees exactly what it
would see alone and greedy output equals transformers' `generate` (tests/lm/test_continuous_batching.py).

Sampling draws each row from its own generator, seeded from (seed, prompt, sample), so a sampled
completion does not depend on the batch size or on which prompts happen to share its steps.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .prefix import SharedPrefix

# Admit waiting prompts once this fraction of the batch is free: each admission is one extra
# forward pass (the weights are read once more), so admitting one prompt per freed row costs more
# than the idle slots it fills.
ADMIT_WHEN_FREE = 0.25


@dataclass
class RunningBatch:
    rows: torch.Tensor  # [B] completion index (prompt * n_samples + sample) of each row, on CPU
    cache: object  # transformers DynamicCache holding every row's prompt and generated tokens so far
    mask: torch.Tensor  # [B, T] 1 where the cache holds a real token of that row
    token: torch.Tensor  # [B] each row's newest token, sampled but not yet in the cache


def concat_caches(model, a: RunningBatch, b: RunningBatch) -> RunningBatch:
    """One batch holding the rows of both, the narrower cache left-padded to the wider one."""
    from transformers import DynamicCache

    width = max(a.mask.shape[1], b.mask.shape[1])

    def pad(x: torch.Tensor, dim_from_end: int) -> torch.Tensor:
        missing = width - x.shape[-dim_from_end]
        return x if missing == 0 else F.pad(x, (0, 0) * (dim_from_end - 1) + (missing, 0))

    cache = DynamicCache(config=model.config)
    for index, (la, lb) in enumerate(zip(a.cache.layers, b.cache.layers)):
        keys = torch.cat([pad(la.keys, 2), pad(lb.keys, 2)])
        values = torch.cat([pad(la.values, 2), pad(lb.values, 2)])
        cache.update(keys, values, index)
    return RunningBatch(
        rows=torch.cat([a.rows, b.rows]),
        cache=cache,
        mask=torch.cat([pad(a.mask, 1), pad(b.mask, 1)]),
        token=torch.cat([a.token, b.token]),
    )


def keep_rows(batch: RunningBatch, keep: torch.Tensor) -> RunningBatch:
    """The batch without its finished rows, and without leading columns no remaining row uses."""
    batch.cache.reorder_cache(keep)
    mask = batch.mask[keep]
    start = int(mask.any(0).nonzero()[0])
    if start > 0 and can_join(batch.cache):
        for layer in batch.cache.layers:
            layer.keys, layer.values = layer.keys[:, :, start:], layer.values[:, :, start:]
        mask = mask[:, start:]
    return RunningBatch(rows=batch.rows[keep.cpu()], cache=batch.cache, mask=mask, token=batch.token[keep])


def can_join(cache) -> bool:
    """Joining rows needs plain growing caches; sliding-window or static layers keep their own
    bookkeeping, so with those a batch is only refilled once it is empty (fixed batches)."""
    from transformers.cache_utils import DynamicLayer

    return all(type(layer) is DynamicLayer for layer in cache.layers)


def sample(logits: torch.Tensor, rows: torch.Tensor, temperature: float, generators: list | None) -> torch.Tensor:
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1).cpu()
    picks = [torch.multinomial(p, 1, generator=generators[r]) for p, r in zip(probs, rows.tolist())]
    return torch.cat(picks).to(logits.device)


@torch.no_grad()
def prefill(
    model, sequences: list[list[int]], prefix: SharedPrefix, n_samples: int
) -> tuple[RunningBatch, torch.Tensor]:
    """A batch of the new prompts (each repeated n_samples times) and their next-token logits."""
    kwargs = prefix.batch(model, sequences, pad_id=0)
    ids, mask = kwargs.pop("input_ids"), kwargs.pop("attention_mask")
    positions, cache = kwargs["position_ids"], kwargs["past_key_values"]
    logits = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=positions,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    ).logits[:, -1]
    if n_samples > 1:
        cache.batch_repeat_interleave(n_samples)
        mask, logits = mask.repeat_interleave(n_samples, 0), logits.repeat_interleave(n_samples, 0)
    empty = torch.empty(0, dtype=torch.long)
    return RunningBatch(rows=empty, cache=cache, mask=mask, token=empty), logits


@torch.no_grad()
def decode_continuous(
    model,
    sequences: list[list[int]],
    max_new_tokens: int,
    stops: list[int],
    batch_size: int,
    temperature: float = 0.0,
    n_samples: int = 1,
    seed: int = 0,
    desc: str = "generate",
) -> list[list[int]]:
    """New token ids for every (prompt, sample), in order prompt-major: row p * n_samples + s.

    `sequences` are token ids of chat-formatted prompts; at most `batch_size` prompts (times
    n_samples rows) decode at once. Prompts are admitted in the order given.
    """
    capacity = batch_size * n_samples
    produced: list[list[int]] = [[] for _ in range(len(sequences) * n_samples)]
    generators = None
    if temperature > 0:
        generators = [torch.Generator().manual_seed(seed * 1_000_003 + row) for row in range(len(produced))]
    device = next(model.parameters()).device
    stop_set = torch.tensor(stops, dtype=torch.long, device=device)
    # The chat template's tokens every prompt starts with are run once and reused by every
    # admission; a single prompt has nothing to share (an empty prefix: plain left padding).
    prefix = (SharedPrefix.build(model, sequences) if len(sequences) > 1 else None) or SharedPrefix(0, [], [])
    waiting = deque(range(len(sequences)))
    batch: RunningBatch | None = None
    joinable = True
    # Counted in tokens, so the bar moves with every decoding step; a completion that stops early
    # skips its unused budget, so the total stays the most tokens the pass can still take.
    progress = tqdm(total=len(produced) * max_new_tokens, desc=desc, unit="tok", leave=False)
    finished = 0
    while waiting or batch is not None:
        free = capacity - (0 if batch is None else len(batch.rows))
        threshold = min(len(waiting) * n_samples, max(n_samples, math.ceil(capacity * ADMIT_WHEN_FREE)))
        if waiting and free >= threshold and (batch is None or joinable):
            admitted = [waiting.popleft() for _ in range(min(len(waiting), free // n_samples))]
            joined, logits = prefill(model, [sequences[p] for p in admitted], prefix, n_samples)
            joined.rows = torch.tensor([p * n_samples + s for p in admitted for s in range(n_samples)])
            joined.token = sample(logits, joined.rows, temperature, generators)
            for row, t in zip(joined.rows.tolist(), joined.token.tolist()):
                produced[row].append(t)
            progress.update(len(joined.rows))
            joinable = can_join(joined.cache)
            batch = joined if batch is None else concat_caches(model, batch, joined)
        done = torch.isin(batch.token, stop_set) | torch.tensor(
            [len(produced[r]) >= max_new_tokens for r in batch.rows.tolist()], device=device
        )
        if bool(done.any()):
            ended = batch.rows[done.cpu()].tolist()
            finished += len(ended)
            progress.update(sum(max_new_tokens - len(produced[r]) for r in ended))
            progress.set_postfix_str(f"{finished}/{len(produced)} completions", refresh=False)
            if bool(done.all()):
                batch = None
                continue
            batch = keep_rows(batch, (~done).nonzero().squeeze(-1))
            continue  # free slots may admit waiting prompts before the next step
        batch.mask = torch.cat([batch.mask, batch.mask.new_ones(batch.mask.shape[0], 1)], dim=-1)
        positions = batch.mask.sum(-1, keepdim=True) - 1
        logits = model(
            input_ids=batch.token.unsqueeze(-1),
            attention_mask=batch.mask,
            position_ids=positions,
            past_key_values=batch.cache,
            use_cache=True,
        ).logits[:, -1]
        batch.token = sample(logits, batch.rows, temperature, generators)
        for row, t in zip(batch.rows.tolist(), batch.token.tolist()):
            produced[row].append(t)
        progress.update(len(batch.rows))
    progress.close()
    return produced

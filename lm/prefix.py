"""A prompt prefix shared by every prompt of a set, computed once and reused from a KV cache.

Chat templates put the same tokens in front of every instruction (Qwen's default system prompt
and the user-turn header are 24 of the ~42 tokens of a typical AdvBench prompt). Their keys and
values at every layer do not depend on what follows, so one pass over the prefix serves every
prompt: each batch then runs only its prompts' own tokens (the suffixes), attending to the cached
prefix. The suffixes are left-padded among themselves, so padding sits between prefix and suffix;
the attention mask hides it and position ids count only real tokens, so every real token sees
exactly the keys and rotary positions it has in the unpadded prompt. Values equal the plain
left-padded pass up to float rounding (tests/lm/test_prefix.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


def common_prefix_length(sequences: list[list[int]]) -> int:
    """Number of leading tokens all sequences share."""
    if not sequences:
        return 0
    n = min(len(s) for s in sequences)
    first = sequences[0]
    for i in range(n):
        if any(s[i] != first[i] for s in sequences):
            return i
    return n


@dataclass
class SharedPrefix:
    length: int
    keys: list[torch.Tensor]  # per layer [1, kv_heads, length, head_dim]
    values: list[torch.Tensor]

    @classmethod
    @torch.no_grad()
    def build(cls, model: nn.Module, sequences: list[list[int]], keep_last: int = 1) -> SharedPrefix | None:
        """The prefix all `sequences` share, leaving at least `keep_last` tokens to each suffix;
        None when there is none to share."""
        length = min(common_prefix_length(sequences), min(len(s) for s in sequences) - max(1, keep_last))
        if length <= 0:
            return None
        from transformers import DynamicCache

        from .architecture import backbone

        base = backbone(model)
        device = next(model.parameters()).device
        cache = DynamicCache(config=model.config)
        ids = torch.tensor([sequences[0][:length]], device=device)
        base(input_ids=ids, attention_mask=torch.ones_like(ids), past_key_values=cache, use_cache=True)
        keys = [layer.keys for layer in cache.layers]
        values = [layer.values for layer in cache.layers]
        return cls(length=length, keys=keys, values=values)

    def cache(self, batch: int, model: nn.Module):
        """A fresh KV cache holding the prefix for `batch` rows (views, no copies)."""
        from transformers import DynamicCache

        cache = DynamicCache(config=model.config)
        for index, (k, v) in enumerate(zip(self.keys, self.values)):
            cache.update(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1), index)
        return cache

    def batch(self, model: nn.Module, sequences: list[list[int]], pad_id: int) -> dict:
        """Forward keyword arguments for the suffixes of `sequences` (left-padded) after the prefix."""
        device = next(model.parameters()).device
        suffixes = [s[self.length :] for s in sequences]
        width = max(len(s) for s in suffixes)
        ids = torch.full((len(suffixes), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(suffixes), width), dtype=torch.long)
        for row, s in enumerate(suffixes):
            ids[row, width - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[row, width - len(s) :] = 1
        positions = (self.length + mask.cumsum(-1) - 1).clamp(min=self.length)
        full_mask = torch.cat([torch.ones((len(suffixes), self.length), dtype=torch.long), mask], dim=-1)
        return dict(
            input_ids=ids.to(device),
            attention_mask=full_mask.to(device),
            position_ids=positions.to(device),
            past_key_values=self.cache(len(suffixes), model),
            use_cache=True,
        )

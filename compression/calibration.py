"""Calibration data for block-sequential compression: chat-formatted instructions, tokenized.

Padding tokens are kept out of every statistic through the attention mask that travels with
each batch.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from lm import datasets
from lm.chat import format_prompts, tokenize_prompts
from lm.errors import UserError

SOURCES = ("harmless", "harmful")


@dataclass(frozen=True)
class CalibrationConfig:
    source: str = "harmless"  # harmless_train (utility) or harmful_train (safety) instructions
    n_samples: int = 128
    seqlen: int = 256  # longer samples keep their last seqlen tokens (the template end matters most)
    batch_size: int = 16
    seed: int = 0

    def __post_init__(self):
        if self.source not in SOURCES:
            raise UserError(f"unknown calibration source {self.source!r}; choose one of {', '.join(SOURCES)}")
        if self.n_samples <= 0 or self.seqlen <= 0 or self.batch_size <= 0:
            raise UserError("calibration n_samples, seqlen and batch_size must be positive")


@dataclass
class Calibration:
    batches: list[dict[str, torch.Tensor]]  # input_ids, attention_mask (left padded)
    digest: str  # SHA-256 of the token ids: recorded in every manifest

    @property
    def n_tokens(self) -> int:
        return int(sum(b["attention_mask"].sum() for b in self.batches))


def calibration_set(tokenizer, cfg: CalibrationConfig = CalibrationConfig()) -> Calibration:
    pool = datasets.instructions(cfg.source, "train")
    texts = format_prompts(tokenizer, datasets.sample(pool, cfg.n_samples, cfg.seed))
    return tokenize_calibration(tokenizer, texts, cfg.seqlen, cfg.batch_size)


def tokenize_calibration(tokenizer, texts: list[str], seqlen: int, batch_size: int) -> Calibration:
    if not texts:
        raise UserError("calibration set is empty")
    digest = hashlib.sha256()
    batches = []
    for start in range(0, len(texts), batch_size):
        enc = tokenize_prompts(tokenizer, texts[start : start + batch_size])
        ids, mask = enc["input_ids"][:, -seqlen:], enc["attention_mask"][:, -seqlen:]
        for row, m in zip(ids, mask):
            digest.update(row[m.bool()].numpy().tobytes())
        batches.append(dict(input_ids=ids, attention_mask=mask))
    return Calibration(batches=batches, digest=digest.hexdigest())

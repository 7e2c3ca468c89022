"""Calibration data: chat-formatted instructions, optionally followed by the model's own greedy
replies, tokenized, for block-sequential compression (Wanda, SparseGPT, GPTQ); and (prompt, response)
pairs with response-only labels for gradient scores (SNIP).

Why replies: 128 prompts alone are ~5k tokens, over half of them the same default system prompt,
few and alike for the Hessians SparseGPT and GPTQ invert (the MLP down projection's is 4864 wide
in the embedded model); their optimal-brain-surgeon updates can then fit that narrow set rather
than the model's real inputs, while Wanda only reads column norms. Replies add tokens of the kind
the model produces. (README, "Calibration", has the measurements.)

Padding tokens are kept out of every statistic through the attention mask that travels with
each batch (and, for pairs, through labels of -100).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace

import torch

from lm import datasets
from lm.chat import format_prompts, tokenize_prompts
from lm.errors import UserError

SOURCES = ("harmless", "harmful")  # instruction sets
TEXT_SOURCE = "wikitext"


@dataclass(frozen=True)
class CalibrationConfig:
    # harmless_train (utility) or harmful_train (safety) instructions; or "wikitext": plain text
    # windows, as the Wanda and SparseGPT papers calibrate (on C4; here the half of the vendored
    # wikitext-2 test text that perplexity never reads, so in-domain for that perplexity)
    source: str = "harmless"
    n_samples: int = 128
    #: longer samples keep their last seqlen tokens (the template end matters most); text: window length
    seqlen: int = 256
    batch_size: int = 16
    seed: int = 0
    # Each prompt followed by the model's own greedy reply of at most this many tokens (0: the
    # prompt alone, the default until a perplexity run shows replies help; see the module docstring).
    reply_tokens: int = 0

    def __post_init__(self):
        if self.source not in SOURCES + (TEXT_SOURCE,):
            raise UserError(
                f"unknown calibration source {self.source!r}; choose one of {', '.join(SOURCES + (TEXT_SOURCE,))}"
            )
        if self.n_samples <= 0 or self.seqlen <= 0 or self.batch_size <= 0:
            raise UserError("calibration n_samples, seqlen and batch_size must be positive")
        if self.reply_tokens < 0:
            raise UserError(f"calibration reply_tokens must be >= 0, got {self.reply_tokens}")
        if self.reply_tokens and self.source == TEXT_SOURCE:
            raise UserError(
                "wikitext calibration is plain text: it has no instructions to reply to (reply_tokens must be 0)"
            )

    def describe(self) -> str:
        """One line for manifests: which data, how much of it."""
        if self.source == TEXT_SOURCE:
            return (
                f"{self.n_samples} x {self.seqlen} tokens of wikitext-2 test text from character "
                f"{datasets.WIKITEXT_CALIBRATION_FROM:,} on (perplexity reads only the text before it)"
            )
        text = f"own greedy replies (<= {self.reply_tokens} tokens)" if self.reply_tokens else "no replies"
        return (
            f"{self.n_samples} {self.source} train instructions (seed {self.seed}), {text}, last {self.seqlen} tokens"
        )


@dataclass
class Calibration:
    batches: list[dict[str, torch.Tensor]]  # input_ids, attention_mask (padded; the mask marks real tokens)
    digest: str  # SHA-256 of the token ids: recorded in every manifest
    description: str = ""  # CalibrationConfig.describe() of the config that made it

    def rows(self) -> list[list[int]]:
        """Each calibration row's real token ids (padding dropped): how other libraries take calibration data."""
        return [
            ids[mask.bool()].tolist() for b in self.batches for ids, mask in zip(b["input_ids"], b["attention_mask"])
        ]

    @property
    def n_tokens(self) -> int:
        return int(sum(b["attention_mask"].sum() for b in self.batches))


def calibration_set(tokenizer, cfg: CalibrationConfig = CalibrationConfig(), model=None) -> Calibration:
    """Sampled instructions, chat-formatted; with cfg.reply_tokens, each followed by `model`'s greedy reply.
    Or, for source "wikitext", consecutive text windows."""
    if cfg.source == TEXT_SOURCE:
        return replace(
            text_calibration(
                tokenizer, datasets.wikitext2_calibration_text(), cfg.n_samples, cfg.seqlen, cfg.batch_size
            ),
            description=cfg.describe(),
        )
    if not cfg.reply_tokens:
        pool = datasets.instructions(cfg.source, "train")
        texts = format_prompts(tokenizer, datasets.sample(pool, cfg.n_samples, cfg.seed))
        return replace(tokenize_calibration(tokenizer, texts, cfg.seqlen, cfg.batch_size), description=cfg.describe())
    if model is None:
        raise UserError(
            f"calibration with replies (reply_tokens={cfg.reply_tokens}) needs the model; pass model=, or reply_tokens=0"
        )
    replies = response_calibration_set(
        model,
        tokenizer,
        ResponseCalibrationConfig(
            source=cfg.source,
            n_samples=cfg.n_samples,
            max_new_tokens=cfg.reply_tokens,
            seqlen=cfg.seqlen,
            batch_size=cfg.batch_size,
            seed=cfg.seed,
        ),
    )
    # Every token, prompt and reply, is a layer input to fit; the response-only labels are not needed.
    batches = [dict(input_ids=b["input_ids"], attention_mask=b["attention_mask"]) for b in replies.batches]
    return Calibration(batches=batches, digest=replies.digest, description=cfg.describe())


def text_calibration(tokenizer, text: str, n_samples: int, seqlen: int, batch_size: int) -> Calibration:
    """The first n_samples consecutive windows of seqlen tokens of `text` (no padding, no template)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < n_samples * seqlen:
        raise UserError(f"calibration text has {len(ids):,} tokens, fewer than {n_samples} x {seqlen}")
    windows = torch.tensor(ids[: n_samples * seqlen]).view(n_samples, seqlen)
    batches = [dict(input_ids=w, attention_mask=torch.ones_like(w)) for w in windows.split(batch_size)]
    return Calibration(batches=batches, digest=hashlib.sha256(windows.numpy().tobytes()).hexdigest())


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


# --- (prompt, response) calibration for gradient-based scores (SNIP) ------------------------------


@dataclass(frozen=True)
class ResponseCalibrationConfig:
    """The model's own greedy replies to sampled instructions, scored as next-token targets."""

    source: str = "harmless"  # harmless_train: utility responses; harmful_train: (for an aligned model) refusals
    n_samples: int = 128
    max_new_tokens: int = 64
    seqlen: int = 256  # prompt + response tokens; long prompts lose their beginning first
    batch_size: int = 1  # 1: |W * grad| is taken per sample before summing, as Wei et al. do
    seed: int = 0

    def __post_init__(self):
        if self.source not in SOURCES:
            raise UserError(f"unknown calibration source {self.source!r}; choose one of {', '.join(SOURCES)}")
        if min(self.n_samples, self.max_new_tokens, self.seqlen, self.batch_size) <= 0:
            raise UserError("response calibration n_samples, max_new_tokens, seqlen and batch_size must be positive")


@dataclass
class ResponseCalibration:
    pairs: list[tuple[str, str]]  # (chat-formatted prompt, response text)
    batches: list[dict[str, torch.Tensor]]  # input_ids, attention_mask, labels (right padded; -100 off the response)
    digest: str  # SHA-256 of token ids and labels

    @property
    def n_response_tokens(self) -> int:
        return int(sum((b["labels"] != -100).sum() for b in self.batches))


def response_calibration_set(
    model, tokenizer, cfg: ResponseCalibrationConfig = ResponseCalibrationConfig()
) -> ResponseCalibration:
    """Greedy-generate the model's replies to n sampled instructions; empty replies are dropped."""
    from lm.generation import SamplingConfig, generate

    pool = datasets.instructions(cfg.source, "train")
    prompts = format_prompts(tokenizer, datasets.sample(pool, cfg.n_samples, cfg.seed))
    replies = generate(
        model,
        tokenizer,
        prompts,
        SamplingConfig(max_new_tokens=cfg.max_new_tokens, seed=cfg.seed),
        desc="calibration replies",
    )
    pairs = [(p, r[0]) for p, r in zip(prompts, replies) if tokenizer(r[0], add_special_tokens=False)["input_ids"]]
    if not pairs:
        raise UserError("every calibration reply was empty; cannot score responses")
    return tokenize_pairs(tokenizer, pairs, cfg.seqlen, cfg.batch_size)


def tokenize_pairs(
    tokenizer, pairs: list[tuple[str, str]], seqlen: int = 256, batch_size: int = 1
) -> ResponseCalibration:
    """Batches whose labels are the response tokens only (-100 on prompt and padding).

    Prompt and response are tokenized separately, as in generation, so the label boundary is
    exactly where the reply began. Right padding: the loss forward passes no position ids, and
    right padding keeps every real token at its true position.
    """
    if not pairs:
        raise UserError("response calibration set is empty")
    digest = hashlib.sha256()
    rows = []
    for prompt, response in pairs:
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        r = tokenizer(response, add_special_tokens=False)["input_ids"]
        if not r:
            raise UserError(f"empty response for prompt {prompt[-60:]!r}")
        r = r[: max(seqlen - len(p), seqlen // 2, 1)]
        ids = (p + r)[-seqlen:]
        labels = ([-100] * len(p) + r)[-seqlen:]
        digest.update(torch.tensor(ids + labels).numpy().tobytes())
        rows.append((ids, labels))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0  # masked out; any id works
    batches = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        pad = lambda seq, value: seq + [value] * (width - len(seq))
        batches.append(
            dict(
                input_ids=torch.tensor([pad(ids, pad_id) for ids, _ in chunk]),
                attention_mask=torch.tensor([pad([1] * len(ids), 0) for ids, _ in chunk]),
                labels=torch.tensor([pad(labels, -100) for _, labels in chunk]),
            )
        )
    return ResponseCalibration(pairs=list(pairs), batches=batches, digest=digest.hexdigest())

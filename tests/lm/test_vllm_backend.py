"""Backend choice ("auto"), the served-checkpoint check, and vLLM itself where it is installed."""

from __future__ import annotations

import pytest
import torch

import lm.generation as generation
from lm.chat import format_prompts
from lm.errors import UserError
from lm.generation import SamplingConfig, generate, resolve_backend, vllm_available
from lm.loading import load_model
from lm.served_checkpoint import served_checkpoint
from tests.tiny import build_model, build_tokenizer, save_tiny

INSTRUCTIONS = ["Write a poem about the sea", "List three colours", "Explain gravity", "Name a fruit"]


@pytest.fixture
def saved(tiny_model_dir):
    """A tiny model loaded from its own safetensors directory, as variants are."""
    loaded = load_model(str(tiny_model_dir("qwen2", seed=3)))
    return loaded.model, loaded.tokenizer


def test_default_backend_is_auto_and_auto_accepts_tensor_parallelism():
    assert SamplingConfig().backend == "auto"
    assert SamplingConfig(tensor_parallel_size=2).tensor_parallel_size == 2
    with pytest.raises(UserError, match="tensor_parallel_size"):
        SamplingConfig(backend="hf", tensor_parallel_size=2)


def test_served_checkpoint_accepts_the_model_it_was_loaded_from(saved):
    model, _ = saved
    path = served_checkpoint(model)
    assert path.is_dir() and served_checkpoint(model) == path  # the second call hits the cache


def test_served_checkpoint_rejects_edits_hooks_and_unsaved_models(saved):
    model, tokenizer = saved
    handle = model.model.layers[0].register_forward_pre_hook(lambda m, a: None)
    try:
        with pytest.raises(UserError, match="hooks"):
            served_checkpoint(model)
    finally:
        handle.remove()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = 0.0  # pruned in memory, not saved
    with pytest.raises(UserError, match="differ"):
        served_checkpoint(model)
    unsaved = build_model("qwen2", build_tokenizer("chatml"))
    with pytest.raises(UserError, match="safetensors directory"):
        served_checkpoint(unsaved)


def test_auto_is_hf_without_vllm_or_where_vllm_is_not_faster(saved, monkeypatch):
    model, _ = saved
    monkeypatch.setattr(generation, "vllm_available", lambda: False)
    assert resolve_backend(model, SamplingConfig()) == "hf"
    monkeypatch.setattr(generation, "vllm_available", lambda: True)
    monkeypatch.setattr(generation, "VLLM_FASTER_ON", ())
    assert resolve_backend(model, SamplingConfig()) == "hf"
    monkeypatch.setattr(generation, "VLLM_FASTER_ON", ("cpu",))
    assert resolve_backend(model, SamplingConfig()) == "vllm"
    assert resolve_backend(model, SamplingConfig(backend="hf-generate")) == "hf-generate"
    with torch.no_grad():
        model.lm_head.weight.mul_(0.5)  # edited in memory: the checkpoint no longer reproduces it
    assert resolve_backend(model, SamplingConfig()) == "hf"


def test_auto_falls_back_to_hf_when_vllm_fails_but_explicit_vllm_raises(saved, monkeypatch, capsys):
    model, tokenizer = saved
    prompts = format_prompts(tokenizer, INSTRUCTIONS[:2])
    monkeypatch.setattr(generation, "vllm_available", lambda: True)
    monkeypatch.setattr(generation, "VLLM_FASTER_ON", ("cpu",))

    def broken(*args, **kwargs):
        raise UserError("vLLM could not serve it: head size 16 unsupported")

    monkeypatch.setattr(generation, "_generate_vllm", broken)
    out = generate(model, tokenizer, prompts, SamplingConfig(max_new_tokens=4))
    assert out == generate(model, tokenizer, prompts, SamplingConfig(max_new_tokens=4, backend="hf"))
    assert "generating with the hf backend instead" in capsys.readouterr().err
    with pytest.raises(UserError, match="head size"):
        generate(model, tokenizer, prompts, SamplingConfig(max_new_tokens=4, backend="vllm"))


def test_explicit_vllm_without_vllm_names_both_extras(saved, monkeypatch):
    model, tokenizer = saved
    monkeypatch.setattr(generation, "vllm_available", lambda: False)
    with pytest.raises(UserError, match=r"refusal-repair\[vllm-cpu\]"):
        generate(model, tokenizer, format_prompts(tokenizer, ["hi"]), SamplingConfig(max_new_tokens=2, backend="vllm"))


@pytest.mark.skipif(not vllm_available(), reason="vllm (or vllm-cpu) is not installed")
def test_vllm_greedy_matches_the_hf_backend(tmp_path):
    # Head size 64 (4 heads of a 256-wide model), the size vLLM-CPU is known to serve.
    tokenizer = build_tokenizer("chatml")
    model = build_model("qwen2", tokenizer, seed=4, hidden=256, layers=2)
    loaded = load_model(str(save_tiny(tmp_path / "tiny", model, tokenizer)))
    prompts = format_prompts(loaded.tokenizer, INSTRUCTIONS)
    cfg = dict(max_new_tokens=8)
    ours = generate(loaded.model, loaded.tokenizer, prompts, SamplingConfig(backend="vllm", **cfg))
    reference = generate(loaded.model, loaded.tokenizer, prompts, SamplingConfig(backend="hf", **cfg))
    # Different kernels may flip a near-tie; the tiny model's wide init makes that rare.
    assert sum(a == b for a, b in zip(ours, reference)) >= len(prompts) - 1

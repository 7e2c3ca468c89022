"""Generation (lm.generation): batching, sampling, seeds and config checks on tiny random models."""

from __future__ import annotations

import pytest
import torch

from lm.chat import format_prompts
from lm.errors import UserError
from lm.generation import SamplingConfig, generate, vllm_available
from tests.lm.helpers import INSTRUCTIONS, hook_state


def test_greedy_generation_is_independent_of_batch_size(tiny_pair):
    model, tokenizer = tiny_pair
    prompts = format_prompts(tokenizer, INSTRUCTIONS)
    hooks_before = hook_state(model)
    one = generate(model, tokenizer, prompts, SamplingConfig(max_new_tokens=6, batch_size=1))
    four = generate(model, tokenizer, prompts, SamplingConfig(max_new_tokens=6, batch_size=4))
    assert one == four
    assert all(len(c) == 1 for c in one)
    assert any(c[0] for c in one), "a random model should produce some non-special text"
    assert hook_state(model) == hooks_before


def test_sampled_completions_do_not_depend_on_the_batch(tiny_qwen2):
    model, tokenizer = tiny_qwen2
    prompts = format_prompts(tokenizer, INSTRUCTIONS)
    cfg = dict(max_new_tokens=6, temperature=1.0, n_samples=2, seed=3, backend="hf")
    one = generate(model, tokenizer, prompts, SamplingConfig(batch_size=1, **cfg))
    three = generate(model, tokenizer, prompts, SamplingConfig(batch_size=3, **cfg))
    assert one == three
    assert any(c[0] != c[1] for c in one), "two samples of a prompt should differ somewhere"


def test_sampling_is_reproducible_with_a_seed(tiny_qwen2):
    model, tokenizer = tiny_qwen2
    prompts = format_prompts(tokenizer, INSTRUCTIONS[:3])
    cfg = SamplingConfig(max_new_tokens=6, temperature=1.0, n_samples=2, seed=5, batch_size=2)
    first = generate(model, tokenizer, prompts, cfg)
    # Something else consuming the global RNG in between must not matter.
    torch.rand(10)
    second = generate(model, tokenizer, prompts, cfg)
    assert first == second
    assert len(first) == 3 and all(len(c) == 2 for c in first)


def test_generate_auto_batch_size_runs(tiny_llama):
    model, tokenizer = tiny_llama
    prompts = format_prompts(tokenizer, INSTRUCTIONS[:2])
    out = generate(model, tokenizer, prompts, SamplingConfig(max_new_tokens=2))
    assert len(out) == 2


def test_generate_rejects_empty_prompt_list(tiny_qwen2):
    model, tokenizer = tiny_qwen2
    with pytest.raises(UserError, match="no prompts"):
        generate(model, tokenizer, [], SamplingConfig(max_new_tokens=2))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_new_tokens=0), "positive"),
        (dict(n_samples=0, temperature=1.0), "positive"),
        (dict(temperature=-0.1), "temperature"),
        (dict(n_samples=3), "greedy"),
        (dict(backend="tgi"), "backend"),
    ],
)
def test_sampling_config_validation(kwargs, message):
    with pytest.raises(UserError, match=message):
        SamplingConfig(**kwargs)


def test_vllm_backend_without_vllm_is_a_user_error(tiny_qwen2):
    if vllm_available():
        pytest.skip("vllm is installed")
    model, tokenizer = tiny_qwen2
    prompts = format_prompts(tokenizer, ["hi"])
    with pytest.raises(UserError, match="vllm"):
        generate(model, tokenizer, prompts, SamplingConfig(max_new_tokens=2, backend="vllm"))

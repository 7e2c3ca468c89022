"""Tiny random models of the chat-model families the toolkit claims, built offline from configs
(two blocks, width 64), with the tests' byte-level tokenizer: the architecture test matrix."""

from __future__ import annotations

import torch

from tests.tiny import build_tokenizer

HIDDEN, LAYERS = 64, 2


def _config(family: str, tokenizer):
    import transformers as t

    ids = dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_position_embeddings=256,
        initializer_range=0.2,
    )
    llama_like = dict(
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        **ids,
    )
    configs = {
        "llama": lambda: t.LlamaConfig(**llama_like, tie_word_embeddings=False),
        "llama-tied": lambda: t.LlamaConfig(**llama_like, tie_word_embeddings=True),
        "mistral": lambda: t.MistralConfig(**llama_like),
        "qwen2": lambda: t.Qwen2Config(**llama_like, tie_word_embeddings=False),
        "qwen3": lambda: t.Qwen3Config(**llama_like, head_dim=16),
        "gemma2": lambda: t.Gemma2Config(
            **llama_like, head_dim=16, final_logit_softcapping=30.0, attn_logit_softcapping=50.0
        ),
        "gemma3": lambda: t.Gemma3TextConfig(**llama_like, head_dim=16),
        "phi3": lambda: t.Phi3Config(**llama_like),
        "olmo2": lambda: t.Olmo2Config(**llama_like),
        "granite": lambda: t.GraniteConfig(
            **llama_like, embedding_multiplier=2.0, residual_multiplier=0.5, logits_scaling=2.0
        ),
        "gpt_neox": lambda: t.GPTNeoXConfig(
            hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4, **ids
        ),
        "mixtral": lambda: t.MixtralConfig(**llama_like, num_local_experts=4, num_experts_per_tok=2),
        "qwen2_moe": lambda: t.Qwen2MoeConfig(
            **llama_like,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=64,
        ),
    }
    return configs[family]()


FAMILIES = (
    "llama",
    "llama-tied",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma2",
    "gemma3",
    "phi3",
    "olmo2",
    "granite",
    "gpt_neox",
    "mixtral",
    "qwen2_moe",
)


def build_family(family: str, seed: int = 0):
    """(model, tokenizer): a seeded random float32 model of `family` in eval mode."""
    from transformers import AutoModelForCausalLM

    tokenizer = build_tokenizer("chatml")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(family, tokenizer)).to(torch.float32).eval()
    # Norm weights start at one (Gemma: zero, as 1 + w), which hides where a norm sits: a unit
    # RMSNorm keeps a vector orthogonal to a direction orthogonal. Random scales do not.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name and param.dim() == 1:
                param.add_(torch.randn_like(param) * 0.5)
    return model, tokenizer

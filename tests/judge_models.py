"""Tiny random judge models of each judge kind's architecture, saved as loadable directories:
causal LMs (Llama, Mistral) for HarmBench's classifier, Llama Guard and WildGuard, and RoBERTa /
ModernBERT sequence classifiers whose config names their labels. A classifier's head can be
pinned to a fixed probability of its refusal label, so its verdicts are known."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from tests.tiny import build_model, build_tokenizer, save_tiny


def causal_judge(path: Path, arch: str = "llama", chat_template: bool = False, seed: int = 0) -> Path:
    """A tiny causal LM judge; with `chat_template` False its tokenizer has none (the stored
    prompt format is used), True keeps the Llama-2 test template."""
    tokenizer = build_tokenizer("llama2")
    if not chat_template:
        tokenizer.chat_template = None
    if arch == "mistral":
        from transformers import MistralConfig, MistralForCausalLM

        torch.manual_seed(seed)
        model = MistralForCausalLM(
            MistralConfig(
                vocab_size=len(tokenizer),
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=1,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=2048,
                initializer_range=0.2,
                tie_word_embeddings=False,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        ).eval()
    else:
        model = build_model(arch, tokenizer, seed=seed, hidden=32, layers=1)
        model.config.max_position_embeddings = 2048
    return save_tiny(path, model, tokenizer)


def classifier_judge(
    path: Path, arch: str, labels: dict[int, str], refusal_probability: float | None = None, seed: int = 0
) -> Path:
    """A tiny RoBERTa or ModernBERT sequence classifier with `labels` as id2label; with
    `refusal_probability` its head gives the refusal label (the label named refusal or rejection,
    the other one otherwise) that probability for every input."""
    from transformers import (
        ModernBertConfig,
        ModernBertForSequenceClassification,
        RobertaConfig,
        RobertaForSequenceClassification,
    )

    tokenizer = build_tokenizer("chatml")
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        id2label=labels,
        label2id={v: k for k, v in labels.items()},
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    if arch == "roberta":
        model = RobertaForSequenceClassification(RobertaConfig(**common, max_position_embeddings=600))
        head = model.classifier.out_proj
    else:
        ids = dict(
            bos_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.pad_token_id,
            cls_token_id=tokenizer.pad_token_id,
            sep_token_id=tokenizer.pad_token_id,
        )
        model = ModernBertForSequenceClassification(ModernBertConfig(**common, **ids, max_position_embeddings=600))
        head = model.classifier
    if refusal_probability is not None:
        refusal = next((i for i, n in labels.items() if n.lower() in ("refusal", "rejection")), 1)
        with torch.no_grad():
            head.weight.zero_()
            head.bias.zero_()
            # Two labels: softmax(0, b)[1] = p when b = log(p / (1 - p)).
            head.bias[refusal] = math.log(refusal_probability / (1 - refusal_probability))
    return save_tiny(path, model.eval(), tokenizer)


def broken_judge(path: Path) -> Path:
    """A directory that passes every check without a model (a causal LM config, a tokenizer, a
    .safetensors file) but whose weights are not a safetensors file: it does not load."""
    causal_judge(path)
    for f in path.glob("*.safetensors"):
        f.write_bytes(b"not a safetensors file")
    return path

"""Tiny random models and tokenizers built offline, for tests that must not touch the hub or the
embedded model.

Importable from test modules (`from tests.tiny import ...`); conftest.py wraps these in fixtures.
The tokenizer is a byte-level BPE trained in-process on a handful of sentences, so every string
is encodable and offsets behave like a real GPT-2/Qwen-style tokenizer.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch

ARCHS = ("llama", "qwen2")
TEMPLATES = ("chatml", "llama2")

# Registered as added special tokens so each renders as exactly one id, as in real chat models.
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<s>", "</s>", "[INST]", "[/INST]")

DEFAULT_SYSTEM = "You are a tiny test assistant."

# Qwen-style: a default system turn is inserted when the conversation has none.
CHATML_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}"
    "{%- set system = '" + DEFAULT_SYSTEM + "' -%}{%- set turns = messages -%}"
    "{%- endif -%}"
    "{{ '<|im_start|>system\\n' + system + '<|im_end|>\\n' }}"
    "{%- for m in turns -%}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

# Llama-2-chat: the system prompt lives inside the first [INST] block; no generation prompt.
LLAMA2_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set sys = '<<SYS>>\\n' + messages[0]['content'] + '\\n<</SYS>>\\n\\n' -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}"
    "{%- set sys = '' -%}{%- set turns = messages -%}"
    "{%- endif -%}"
    "{%- for m in turns -%}"
    "{%- if m['role'] == 'user' -%}"
    "{{ bos_token + '[INST] ' + (sys if loop.first else '') + m['content'] + ' [/INST]' }}"
    "{%- else -%}"
    "{{ ' ' + m['content'] + ' ' + eos_token }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

_CORPUS = [
    "Describe the structure of a water molecule in detail.",
    "You are a helpful assistant. Answer the user briefly.",
    "How do I bake bread at home? Mix flour, water and yeast.",
    "Write a short poem about the sea and the wind.",
    "I cannot help with that request, sorry.",
    "system user assistant instruction response",
]


@lru_cache(maxsize=1)
def _trained_bpe_json() -> str:
    # Training is deterministic for a fixed corpus; caching the serialised result keeps each
    # test's tokenizer a fresh, independently mutable object.
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer)
    return tok.to_str()


def build_tokenizer(template: str = "chatml"):
    """A fast tokenizer with the given chat template ('chatml' or 'llama2')."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}")
    backend = Tokenizer.from_str(_trained_bpe_json())
    if template == "chatml":
        tokens = dict(eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHATML_TEMPLATE)
    else:
        tokens = dict(bos_token="<s>", eos_token="</s>", pad_token="<|endoftext|>", chat_template=LLAMA2_TEMPLATE)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **tokens)
    tokenizer.padding_side = "left"
    return tokenizer


def build_model(arch: str, tokenizer, seed: int = 0, hidden: int = 64, layers: int = 4):
    """A seeded random float32 causal LM in eval mode, vocabulary sized to `tokenizer`."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        # Wider than the default 0.02 so logits have clear maxima: greedy decoding must not
        # hinge on float-rounding ties when comparing batched against unbatched runs.
        initializer_range=0.2,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if arch == "llama":
        config, cls = LlamaConfig(**common), LlamaForCausalLM
    elif arch == "qwen2":
        config, cls = Qwen2Config(**common), Qwen2ForCausalLM
    else:
        raise ValueError(f"unknown arch {arch!r}")
    torch.manual_seed(seed)
    model = cls(config).to(torch.float32)
    model.eval()
    return model


def template_for(arch: str) -> str:
    """The pairing used throughout the tests: Qwen2 speaks ChatML, Llama speaks Llama-2."""
    return "chatml" if arch == "qwen2" else "llama2"


def build_pair(arch: str, seed: int = 0):
    tokenizer = build_tokenizer(template_for(arch))
    return build_model(arch, tokenizer, seed=seed), tokenizer


def save_tiny(path: Path, model, tokenizer) -> Path:
    """Write a loadable Hugging Face directory (safetensors weights) for `lm.loading.load_model`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path

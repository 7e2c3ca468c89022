"""Direction extraction: mean block inputs at the post-instruction positions, three ways.

baseline  `output_hidden_states=True` on left-padded batches: every layer's hidden states at every
          position, and the LM head's logits at every position, then the post-instruction slice;
hooks     forward pre-hooks keep only the post-instruction positions, and the pass stops at the
          last block needed (no final block, no LM head);
default   refusal.direction.candidate_directions: the hooks, plus the template prefix shared by
          every prompt computed once and reused from a KV cache (lm.prefix), batches in length order.

All three give the same difference-of-means directions up to float rounding (checked here).
"""

from __future__ import annotations

import torch

from lm import datasets
from lm.chat import format_prompts, post_instruction, tokenize_prompts
from lm.hooks import capture
from lm.loading import load_model
from refusal.direction import candidate_directions

from .measure import measure
from .row import row
from .settings import Settings


@torch.no_grad()
def _means_hidden_states(model, tokenizer, instructions: list[str], batch_size: int) -> torch.Tensor:
    positions = post_instruction(tokenizer).positions
    prompts = format_prompts(tokenizer, instructions)
    device = next(model.parameters()).device
    total = None
    for start in range(0, len(prompts), batch_size):
        enc = tokenize_prompts(tokenizer, prompts[start : start + batch_size]).to(device)
        hidden = model(**enc, output_hidden_states=True, use_cache=False).hidden_states[:-1]
        # hidden_states[l] is block l's input; [-1] is the final norm's output, not a block input.
        acts = torch.stack([h[:, positions].float() for h in hidden], dim=2)
        total = acts.double().sum(0) if total is None else total + acts.double().sum(0)
    return (total / len(prompts)).float()


@torch.no_grad()
def _means_hooks(model, tokenizer, instructions: list[str], batch_size: int) -> torch.Tensor:
    positions = post_instruction(tokenizer).positions
    prompts = format_prompts(tokenizer, instructions)
    device = next(model.parameters()).device
    total = None
    for start in range(0, len(prompts), batch_size):
        enc = tokenize_prompts(tokenizer, prompts[start : start + batch_size]).to(device)
        acts = capture(model, enc["input_ids"], enc["attention_mask"], positions)["resid_pre"]
        total = acts.double().sum(0) if total is None else total + acts.double().sum(0)
    return (total / len(prompts)).float()


def _directions(means_fn, model, tokenizer, harmful, harmless, batch_size) -> torch.Tensor:
    return means_fn(model, tokenizer, harmful, batch_size) - means_fn(model, tokenizer, harmless, batch_size)


def rows(settings: Settings) -> list[dict]:
    loaded = load_model(settings.model)
    model, tok = loaded.model, loaded.tokenizer
    n, bs = settings.direction_prompts, settings.direction_batch
    harmful = datasets.sample(datasets.instructions("harmful", "train"), n, 0)
    harmless = datasets.sample(datasets.instructions("harmless", "train"), n, 0)
    device = next(model.parameters()).device
    base = measure(lambda: _directions(_means_hidden_states, model, tok, harmful, harmless, bs), device)
    hooks = measure(lambda: _directions(_means_hooks, model, tok, harmful, harmless, bs), device)
    default = measure(lambda: candidate_directions(model, tok, harmful, harmless, batch_size=bs)["directions"], device)
    reference = base.result
    out = []
    for name, m in (
        ("hooks at post-instruction positions, stop after last block", hooks),
        ("hooks + shared-prefix KV cache, length-sorted (default)", default),
    ):
        diff = float((m.result - reference).abs().max())
        out.append(
            row(
                f"direction extraction, {n}+{n} prompts, batch {bs}",
                "output_hidden_states",
                name,
                base,
                m,
                check=f"max abs diff {diff:.1e}",
                note=f"directions {tuple(reference.shape)}",
            )
        )
    return out

"""Difference-of-means refusal directions at every layer and post-instruction position.

For harmful and harmless instructions, average the block inputs (resid_pre) at the template tokens
after the instruction; the candidate direction at (position, layer) is mean_harmful - mean_harmless
(Arditi et al. 2024).
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from lm.chat import format_prompts, post_instruction, tokenize_prompts
from lm.errors import UserError
from lm.hooks import capture, decoder_layers
from lm.prefix import SharedPrefix


def _batched_activations(model, tokenizer, instructions: list[str], batch_size: int, system: str | None, desc: str):
    """(prompt indices, resid_pre [batch, n_positions, n_layers, d_model] float32) per batch.

    The chat template's prefix shared by every prompt (system prompt, user-turn header) runs once
    and is reused from a KV cache (lm.prefix); prompts are batched in order of length so batches
    pad little. Both change the result only by float rounding.
    """
    if not instructions:
        raise UserError("cannot compute activations of an empty instruction set")
    positions = post_instruction(tokenizer, system).positions
    prompts = format_prompts(tokenizer, instructions, system)
    sequences = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    prefix = SharedPrefix.build(model, sequences, keep_last=len(positions))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    order = sorted(range(len(sequences)), key=lambda i: (-len(sequences[i]), i))
    device = next(model.parameters()).device
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", leave=False):
        idx = order[start : start + batch_size]
        if prefix is None:
            enc = tokenize_prompts(tokenizer, [prompts[i] for i in idx]).to(device)
            yield idx, capture(model, enc["input_ids"], enc["attention_mask"], positions)["resid_pre"]
        else:
            kwargs = prefix.batch(model, [sequences[i] for i in idx], pad_id)
            ids, mask = kwargs.pop("input_ids"), kwargs.pop("attention_mask")
            yield idx, capture(model, ids, mask, positions, forward_kwargs=kwargs)["resid_pre"]


@torch.no_grad()
def mean_activations(
    model,
    tokenizer,
    instructions: list[str],
    batch_size: int = 16,
    system: str | None = None,
    desc: str = "activations",
) -> torch.Tensor:
    """Mean resid_pre over `instructions`: [n_positions, n_layers, d_model], float32 (summed in float64)."""
    total = None
    for _, acts in _batched_activations(model, tokenizer, instructions, batch_size, system, desc):
        batch_sum = acts.double().sum(dim=0)
        total = batch_sum if total is None else total + batch_sum
    return (total / len(instructions)).float()


@torch.no_grad()
def prompt_activations(
    model,
    tokenizer,
    instructions: list[str],
    batch_size: int = 16,
    system: str | None = None,
    desc: str = "activations",
) -> torch.Tensor:
    """resid_pre of each instruction, in input order: [n, n_positions, n_layers, d_model], float32."""
    out = None
    for idx, acts in _batched_activations(model, tokenizer, instructions, batch_size, system, desc):
        if out is None:
            out = torch.empty((len(instructions), *acts.shape[1:]), dtype=torch.float32)
        out[idx] = acts
    return out


def diff_of_means(harmful_mean: torch.Tensor, harmless_mean: torch.Tensor) -> torch.Tensor:
    return harmful_mean - harmless_mean


def candidate_directions(
    model, tokenizer, harmful: list[str], harmless: list[str], batch_size: int = 16, system: str | None = None
) -> dict[str, torch.Tensor]:
    """Means and candidate directions, each [n_positions, n_layers, d_model]."""
    mean_harmful = mean_activations(model, tokenizer, harmful, batch_size, system, "harmful activations")
    mean_harmless = mean_activations(model, tokenizer, harmless, batch_size, system, "harmless activations")
    return dict(
        mean_harmful=mean_harmful, mean_harmless=mean_harmless, directions=diff_of_means(mean_harmful, mean_harmless)
    )


def cosine_map(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of two direction sets along d_model: [..., d] x [..., d] -> [...]."""
    if a.shape != b.shape:
        raise UserError(f"direction tensors differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).float()


def norm_peak(directions: torch.Tensor, position: int = -1) -> int:
    """Layer where the direction's norm (at a post-instruction position, default the last) peaks."""
    return int(directions[position].norm(dim=-1).argmax())


def n_layers(model) -> int:
    return len(decoder_layers(model))

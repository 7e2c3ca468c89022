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


@torch.no_grad()
def mean_activations(model, tokenizer, instructions: list[str], batch_size: int = 16, system: str | None = None, desc: str = "activations") -> torch.Tensor:
    """Mean resid_pre over `instructions`: [n_positions, n_layers, d_model], float32 (summed in float64)."""
    if not instructions:
        raise UserError("cannot compute mean activations of an empty instruction set")
    positions = post_instruction(tokenizer, system).positions
    prompts = format_prompts(tokenizer, instructions, system)
    device = next(model.parameters()).device
    total = None
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, unit="batch", leave=False):
        enc = tokenize_prompts(tokenizer, prompts[start : start + batch_size]).to(device)
        acts = capture(model, enc["input_ids"], enc["attention_mask"], positions)["resid_pre"]
        batch_sum = acts.double().sum(dim=0)
        total = batch_sum if total is None else total + batch_sum
    return (total / len(prompts)).float()


def diff_of_means(harmful_mean: torch.Tensor, harmless_mean: torch.Tensor) -> torch.Tensor:
    return harmful_mean - harmless_mean


def candidate_directions(model, tokenizer, harmful: list[str], harmless: list[str], batch_size: int = 16, system: str | None = None) -> dict[str, torch.Tensor]:
    """Means and candidate directions, each [n_positions, n_layers, d_model]."""
    mean_harmful = mean_activations(model, tokenizer, harmful, batch_size, system, "harmful activations")
    mean_harmless = mean_activations(model, tokenizer, harmless, batch_size, system, "harmless activations")
    return dict(mean_harmful=mean_harmful, mean_harmless=mean_harmless, directions=diff_of_means(mean_harmful, mean_harmless))


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

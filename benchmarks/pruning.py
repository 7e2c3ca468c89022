"""Block-sequential pruning (Wanda, SparseGPT at 50%): time and peak memory against model size.

compression.blockwise keeps one decoder block's calibration activations alive at a time (its
inputs and outputs for every calibration batch), plus the per-linear statistics: Wanda a vector
per linear, SparseGPT an in_features^2 float64 Hessian per linear. So the peak memory added on top
of the loaded model should stay near those two terms, whatever the depth of the model. Each row
shows the peak next to the model's weights and that estimate, for the main model and for a
smaller one ("scaled": a random model of the same architecture and tokenizer, 4 layers of width
128, built here so no second download is needed).
"""

from __future__ import annotations

import copy

import torch

from compression.blockwise import block_linears
from compression.calibration import CalibrationConfig, calibration_set
from compression.sparsegpt import prune_sparsegpt
from compression.sparsity import SparsityPattern
from compression.wanda import prune_wanda
from lm.hooks import decoder_layers
from lm.loading import load_model

from .measure import measure
from .row import row
from .settings import Settings

MIB = float(1 << 20)


def scaled_down(config, dtype: torch.dtype, layers: int = 4, hidden: int = 128, seed: int = 0):
    """A seeded random model of `config`'s architecture with fewer, narrower layers."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(config)
    heads = 4
    config.num_hidden_layers, config.hidden_size, config.intermediate_size = layers, hidden, 4 * hidden
    config.num_attention_heads = heads
    config.num_key_value_heads = min(getattr(config, "num_key_value_heads", heads) or heads, heads)
    config.head_dim = hidden // heads
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = config.layer_types[:layers]
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def weights_mib(model) -> float:
    return sum(p.numel() * p.element_size() for p in model.parameters()) / MIB


def estimate_mib(model, calibration, method: str) -> float:
    """One block's calibration activations (inputs + outputs) plus the method's statistics."""
    d = model.config.hidden_size
    elt = next(model.parameters()).element_size()
    states = sum(b["input_ids"].numel() for b in calibration.batches) * d * elt * 2
    linears = block_linears(decoder_layers(model)[0]).values()
    stats = sum(lin.in_features * 8 * (lin.in_features if method == "SparseGPT" else 1) for lin in linears)
    return (states + stats) / MIB


def rows(settings: Settings) -> list[dict]:
    main = load_model(settings.model)
    calibration = calibration_set(main.tokenizer, CalibrationConfig(n_samples=settings.prune_samples))
    pattern = SparsityPattern(ratio=0.5)
    config, dtype = main.model.config, next(main.model.parameters()).dtype
    main.model = None  # every row loads its own dense copy
    if settings.small_model == "scaled":
        small_name, small = "scaled", lambda: scaled_down(config, dtype)
    else:
        small_name, small = settings.small_model, lambda: load_model(settings.small_model).model
    out = []
    # Each method prunes a fresh dense model; the main model is reloaded rather than copied so
    # that two copies never sit in memory.
    for name, fresh in ((small_name, small), (main.name, lambda: load_model(settings.model).model)):
        for method, prune in (("Wanda", prune_wanda), ("SparseGPT", prune_sparsegpt)):
            model = fresh()
            n_params = sum(p.numel() for p in model.parameters())
            m = measure(
                lambda model=model, prune=prune: prune(model, calibration, pattern), next(model.parameters()).device
            )
            out.append(
                row(
                    f"{method} 50% block-sequential, {settings.prune_samples} calibration prompts",
                    "",
                    f"{name} ({n_params / 1e6:.0f}M params, {len(decoder_layers(model))} layers)",
                    None,
                    m,
                    note=f"weights {weights_mib(model):.0f} MiB; one block's activations + statistics ~{estimate_mib(model, calibration, method):.0f} MiB",
                )
            )
            del model
    return out

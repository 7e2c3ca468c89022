"""Harmfulness probes for one model: the forward passes that give their activations, then fitting
one cross-validated logistic regression per (position, layer) (refusal.probes, as the main job's
probes stage does). Two single measurements of one run: the fit's share of the stage is the result.
"""

from __future__ import annotations

from lm import datasets
from lm.loading import load_model
from refusal.direction import prompt_activations
from refusal.probe import default_layer
from refusal.probes import ProbeConfig, correct, fit_probe_grid, probe_parameters

from .measure import measure
from .row import row
from .settings import Settings


def rows(settings: Settings) -> list[dict]:
    loaded = load_model(settings.model)
    model, tok = loaded.model, loaded.tokenizer
    n, n_test, bs = settings.direction_prompts, settings.probe_test, settings.direction_batch
    texts = [
        datasets.sample(datasets.instructions(kind, split), k, 0)
        for kind, split, k in (
            ("harmful", "train", n),
            ("harmless", "train", n),
            ("harmful", "test", n_test),
            ("harmless", "test", n_test),
        )
    ]
    device = next(model.parameters()).device
    acts = measure(lambda: [prompt_activations(model, tok, t, bs) for t in texts], device)
    harmful, harmless, test_h, test_s = acts.result
    _, n_pos, n_layers, _ = harmful.shape
    fit = measure(lambda: probe_parameters(fit_probe_grid(harmful, harmless, ProbeConfig())), device)
    right = correct(fit.result, test_h, test_s)
    layer = default_layer(n_layers)
    check = f"held-out accuracy at (-1, {layer}): {float(right[:, -1, layer].float().mean()):.0%} of {len(right)}"
    return [
        row(
            f"probe activations, {n}+{n} train + {n_test}+{n_test} held-out prompts",
            "-",
            f"prompt_activations, batch {bs} (the forward passes)",
            None,
            acts,
            note=f"activations {tuple(harmful.shape[1:])} per prompt",
        ),
        row(
            f"fit all {n_pos * n_layers} harmfulness probes ({n_pos} positions x {n_layers} layers)",
            "-",
            "standardise + LogisticRegressionCV (6 C values, 5 folds) per cell",
            None,
            fit,
            check=check,
            note=f"{fit.seconds / max(acts.seconds, 1e-9):.2f}x the forward passes' time",
        ),
    ]

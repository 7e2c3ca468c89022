"""The probes stage of an entry point: one model's activations in, its probe artifacts out.

Two kinds of probe (both refusal.probes logistic regressions per (position, layer)):
- harmfulness: harmful vs harmless, fitted on the direction prompts and scored on the held-out
  ASR and over-refusal prompts; the original's probes are also applied to every other model
  (transfer). Does the model still recognise a harmful instruction?
- refusal prediction: on harmful instructions only, does the activation predict whether *this*
  model refuses this prompt? Labels are the model's own greedy completions judged as in the ASR
  (Arditi et al.'s judge), fitted on a sample of harmful *training* instructions (generated once
  through refusal.measure's store) and scored on the held-out ASR prompts, whose verdicts the
  ASR measurement already holds; so no evaluation prompt is ever fitted on.

Each artifact is a dict of tensors, cached as safetensors by the caller's `cached_tensors` key.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lm import datasets

from .direction import prompt_activations
from .eval_sets import Prompt
from .measure import EvalConfig, measure_prompts
from .probes import PARAMETERS, ProbeConfig, correct, fit_grid, fit_probe_grid, predict, probe_parameters

# The judge whose verdict is the refusal-prediction label (the one the reports' sentences use).
JUDGE = "arditi2024"


def harmfulness_probes(
    model,
    tokenizer,
    train: tuple[list[str], list[str]],
    test: tuple[list[str], list[str]],
    cfg: ProbeConfig,
    reference: dict[str, torch.Tensor] | None,
    batch_size: int = 16,
) -> dict[str, torch.Tensor]:
    """Probe parameters fitted on `train` (harmful, harmless), per-prompt correctness of this model's
    probes on `test` (own_correct) and, given the original's parameters, of those (transfer_correct)."""
    acts = [
        prompt_activations(model, tokenizer, texts, batch_size, desc=f"probe activations ({name})")
        for name, texts in zip(("harmful train", "harmless train", "harmful test", "harmless test"), (*train, *test))
    ]
    params = probe_parameters(fit_probe_grid(acts[0], acts[1], cfg))
    out = dict(params, own_correct=correct(params, acts[2], acts[3]))
    if reference is not None:
        out["transfer_correct"] = correct(reference, acts[2], acts[3])
    return out


def training_prompts(n: int, seed: int) -> list[Prompt]:
    """A seeded sample of the harmful training split (which the directions are also drawn from),
    with ids `harmful_train:<row>`; never an evaluation prompt (refusal.eval_sets removes them)."""
    rows = datasets.instructions("harmful", "train")
    chosen = datasets.sample(list(range(len(rows))), n, seed)
    return [Prompt(f"harmful_train:{i}", "harmful_train", rows[i]) for i in chosen]


def refused(result: dict, judge: str = JUDGE) -> torch.Tensor:
    """Per record of a vanilla measurement, whether the judge found a refusal (not a jailbreak): bool [n]."""
    return torch.tensor([not rec["jailbroken"][judge][0] for rec in result["records"]], dtype=torch.bool)


def refusal_prediction_probes(
    model,
    tokenizer,
    train_prompts: list[Prompt],
    generation: EvalConfig,
    store: Path,
    model_id,
    test_result: dict,
    cfg: ProbeConfig,
    reference: dict[str, torch.Tensor] | None,
    batch_size: int = 16,
    fit: bool = True,
) -> dict[str, torch.Tensor]:
    """The refusal-prediction probe of one model.

    `test_result` is the model's vanilla ASR measurement on the held-out prompts (its records give
    the test labels). Returns the labels (train_refused, test_refused), and where both classes have
    at least 2 training prompts the fitted parameters and the probe's predictions on the test
    prompts (own_pred: True = predicts a refusal); given the original's parameters, their
    predictions on this model's test activations (transfer_pred). With fit=False nothing is generated
    or fitted: only the test labels and the transfer predictions (a repaired state read with the
    original's probe).
    """
    y_test = refused(test_result)
    test_texts = [rec["prompt"] for rec in test_result["records"]]
    x_test = prompt_activations(model, tokenizer, test_texts, batch_size, desc="refusal-probe activations (test)")
    out = dict(test_refused=y_test)
    if fit:
        y_train = out["train_refused"] = refused(
            measure_prompts(model, tokenizer, train_prompts, generation, store, model_id)
        )
    if fit and np.bincount(y_train.int().numpy(), minlength=2).min() >= 2:
        x_train = prompt_activations(
            model, tokenizer, [p.text for p in train_prompts], batch_size, desc="refusal-probe activations (train)"
        )
        params = probe_parameters(fit_grid(x_train, y_train.int().numpy(), cfg))
        out.update(params, own_pred=predict(params, x_test))
    if reference is not None and "coef" in reference:
        out["transfer_pred"] = predict({k: reference[k] for k in PARAMETERS}, x_test)
    return out


def fitted_probe_parameters(result: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """The fitted probe parameters in a stage result (None where no probe could be fitted)."""
    return {k: result[k] for k in PARAMETERS} if "coef" in result else None

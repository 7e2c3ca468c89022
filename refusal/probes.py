"""Linear probes for harmfulness: does a model still recognise a harmful instruction?

The difference-of-means direction says where refusal can be steered, not whether the model still
tells harmful from harmless. An L2-regularised logistic regression per (position, layer), fitted
on training activations and scored on held-out instructions, measures that recognition. Applied
unchanged to a compressed variant's activations (transfer), the original's probes show whether
the representation moved (transfer falls, the variant's own probes stay accurate) or is gone
(both fall). Features are standardised inside the pipeline and the regularisation strength is
chosen by stratified cross-validation on the training activations only.

Pure functions on activation tensors ([n, n_positions, n_layers, d_model], e.g. from
refusal.direction.prompt_activations); rates come back as refusal.stats objects.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lm.errors import UserError

from .stats import rate_of


@dataclass(frozen=True)
class ProbeConfig:
    cs: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)  # inverse L2 strengths tried by cross-validation
    folds: int = 5
    seed: int = 0
    max_iter: int = 2000

    def __post_init__(self):
        if not self.cs or any(c <= 0 for c in self.cs):
            raise UserError(f"probe regularisation strengths must be positive, got {self.cs}")
        if self.folds < 2:
            raise UserError(f"probe cross-validation needs at least 2 folds, got {self.folds}")


def fit_probe(x: np.ndarray, y: np.ndarray, cfg: ProbeConfig = ProbeConfig()):
    """Standardise, then logistic regression with C chosen by stratified k-fold log-loss on (x, y)."""
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    y = np.asarray(y, dtype=int)
    counts = np.bincount(y, minlength=2)
    if len(counts) != 2 or counts.min() < cfg.folds:
        raise UserError(f"a probe needs at least {cfg.folds} examples of each class to cross-validate, got {counts.tolist()}")
    folds = StratifiedKFold(cfg.folds, shuffle=True, random_state=cfg.seed)
    model = LogisticRegressionCV(Cs=list(cfg.cs), cv=folds, l1_ratios=(0.0,), scoring="neg_log_loss", max_iter=cfg.max_iter,
                                 random_state=cfg.seed, use_legacy_attributes=False)
    return make_pipeline(StandardScaler(), model).fit(np.asarray(x, dtype=np.float64), y)


def probe_direction(probe) -> np.ndarray:
    """The probe's weight vector in the residual basis (the standardisation undone), unit norm."""
    scaler, model = probe[0], probe[-1]
    w = model.coef_.ravel() / scaler.scale_
    return w / np.linalg.norm(w)


def _labelled(harmful: torch.Tensor, harmless: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
    if harmful.shape[1:] != harmless.shape[1:]:
        raise UserError(f"harmful and harmless activations differ in shape: {tuple(harmful.shape)} vs {tuple(harmless.shape)}")
    y = np.r_[np.ones(len(harmful), dtype=int), np.zeros(len(harmless), dtype=int)]
    return torch.cat([harmful, harmless]).double(), y


def fit_probe_grid(harmful: torch.Tensor, harmless: torch.Tensor, cfg: ProbeConfig = ProbeConfig()) -> list[list]:
    """One harmful-vs-harmless probe per (position, layer): probes[position][layer]."""
    x, y = _labelled(harmful, harmless)
    _, n_pos, n_layers, _ = x.shape
    return [[fit_probe(x[:, p, layer].numpy(), y, cfg) for layer in range(n_layers)] for p in range(n_pos)]


def grid_accuracy(probes: list[list], harmful: torch.Tensor, harmless: torch.Tensor) -> list[list[dict]]:
    """Held-out accuracy of each probe (Wilson interval over the prompts), as probes[position][layer]."""
    x, y = _labelled(harmful, harmless)
    if len(probes) != x.shape[1] or len(probes[0]) != x.shape[2]:
        raise UserError(f"{len(probes)}x{len(probes[0])} probes for activations of {x.shape[1]} positions x {x.shape[2]} layers")
    return [[rate_of(probe.predict(x[:, p, layer].numpy()) == y) for layer, probe in enumerate(row)] for p, row in enumerate(probes)]


def direction_cosines(probes: list[list], directions: torch.Tensor) -> torch.Tensor:
    """Cosine between each probe's residual-basis weight vector and the direction at its (position, layer)."""
    out = torch.empty(directions.shape[:2], dtype=torch.float64)
    for p, row in enumerate(probes):
        for layer, probe in enumerate(row):
            d = directions[p, layer].double().numpy()
            norm = np.linalg.norm(d)
            out[p, layer] = float(probe_direction(probe) @ d / norm) if norm > 0 else float("nan")
    return out


def best_cell(accuracy: list[list[dict]]) -> tuple[int, int]:
    """(position index, layer) of the highest held-out accuracy; ties go to the earliest layer, then position."""
    cells = [(a["value"], -layer, -p) for p, row in enumerate(accuracy) for layer, a in enumerate(row)]
    _, neg_l, neg_p = max(cells)
    return -neg_p, -neg_l

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

import math
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
    """Standardise, then logistic regression with C chosen by stratified k-fold log-loss on (x, y)
    (k = cfg.folds, or the smaller class's size when that is smaller)."""
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    y = np.asarray(y, dtype=int)
    counts = np.bincount(y, minlength=2)
    if len(counts) != 2 or counts.min() < 2:
        raise UserError(f"a probe needs at least 2 examples of each class to cross-validate, got {counts.tolist()}")
    # Fewer folds than cfg.folds only when a class has fewer examples (tiny test runs).
    folds = StratifiedKFold(min(cfg.folds, int(counts.min())), shuffle=True, random_state=cfg.seed)
    model = LogisticRegressionCV(
        Cs=list(cfg.cs),
        cv=folds,
        l1_ratios=(0.0,),
        scoring="neg_log_loss",
        max_iter=cfg.max_iter,
        random_state=cfg.seed,
        use_legacy_attributes=False,
    )
    return make_pipeline(StandardScaler(), model).fit(np.asarray(x, dtype=np.float64), y)


def probe_direction(probe) -> np.ndarray:
    """The probe's weight vector in the residual basis (the standardisation undone), unit norm."""
    scaler, model = probe[0], probe[-1]
    w = model.coef_.ravel() / scaler.scale_
    return w / np.linalg.norm(w)


def _labelled(harmful: torch.Tensor, harmless: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
    if harmful.shape[1:] != harmless.shape[1:]:
        raise UserError(
            f"harmful and harmless activations differ in shape: {tuple(harmful.shape)} vs {tuple(harmless.shape)}"
        )
    y = np.r_[np.ones(len(harmful), dtype=int), np.zeros(len(harmless), dtype=int)]
    return torch.cat([harmful, harmless]).double(), y


def fit_probe_grid(harmful: torch.Tensor, harmless: torch.Tensor, cfg: ProbeConfig = ProbeConfig()) -> list[list]:
    """One harmful-vs-harmless probe per (position, layer): probes[position][layer]."""
    return fit_grid(*_labelled(harmful, harmless), cfg)


def fit_grid(x: torch.Tensor, y: np.ndarray, cfg: ProbeConfig = ProbeConfig()) -> list[list]:
    """One probe of the 0/1 labels `y` per (position, layer) of x [n, P, L, d]: probes[position][layer]."""
    # threadpoolctl limits only the BLAS libraries already loaded: imported after the limit, scipy's
    # OpenBLAS kept its threads and the grid ran 10x slower (49.5 s vs 4.9 s for 30 probes on a shared machine, 2026-12-07).
    import sklearn.linear_model  # noqa: F401
    from threadpoolctl import threadpool_limits

    x = x.double()
    _, n_pos, n_layers, _ = x.shape
    # One BLAS / OpenMP thread: a few hundred prompts make the work too small to share, and threads
    # that spin-wait for a busy core made the grid 5x slower (115 vs 20 CPU s) next to other work.
    with threadpool_limits(limits=1):
        return [[fit_probe(x[:, p, layer].numpy(), y, cfg) for layer in range(n_layers)] for p in range(n_pos)]


def probe_parameters(probes: list[list]) -> dict[str, torch.Tensor]:
    """The fitted grid as tensors (safetensors-storable): standardisation mean / scale, weights
    [P, L, d], intercept and the chosen C [P, L]. A probe predicts harmful where
    ((x - mean) / scale) @ coef + intercept > 0."""

    def stack(get):
        return torch.tensor(np.array([[get(probe) for probe in row] for row in probes]), dtype=torch.float64)

    return dict(
        mean=stack(lambda p: p[0].mean_),
        scale=stack(lambda p: p[0].scale_),
        coef=stack(lambda p: p[-1].coef_.ravel()),
        intercept=stack(lambda p: p[-1].intercept_[0]),
        c=stack(lambda p: float(np.ravel(p[-1].C_)[0])),
    )


def correct(params: dict[str, torch.Tensor], harmful: torch.Tensor, harmless: torch.Tensor) -> torch.Tensor:
    """Per prompt and (position, layer), whether the probes in `params` classify it right: bool
    [n_harmful + n_harmless, P, L]. Applying one model's parameters to another model's
    activations is the transfer test."""
    x, y = _labelled(harmful, harmless)
    return predict(params, x) == torch.from_numpy(y).bool()[:, None, None]


def predict(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The positive class (label 1) predicted by each probe in `params` for activations x [n, P, L, d]: bool [n, P, L]."""
    x = x.double()
    if x.shape[1:] != params["coef"].shape:
        raise UserError(f"probes of shape {tuple(params['coef'].shape)} for activations of shape {tuple(x.shape[1:])}")
    return (((x - params["mean"]) / params["scale"]) * params["coef"]).sum(-1) + params["intercept"] > 0


def accuracy_grid(correctness: torch.Tensor) -> list[list[dict]]:
    """Wilson accuracy over the prompts of each (position, layer) cell of `correct`'s output."""
    return [
        [rate_of(correctness[:, p, layer].tolist()) for layer in range(correctness.shape[2])]
        for p in range(correctness.shape[1])
    ]


def grid_accuracy(probes: list[list], harmful: torch.Tensor, harmless: torch.Tensor) -> list[list[dict]]:
    """Held-out accuracy of each fitted probe (Wilson interval over the prompts), as [position][layer]."""
    return accuracy_grid(correct(probe_parameters(probes), harmful, harmless))


def weight_cosines(params: dict[str, torch.Tensor], directions: torch.Tensor) -> torch.Tensor:
    """Cosine between each probe's residual-basis weights (coef / scale) and the direction at its
    (position, layer): [P, L] float64, NaN where the direction is zero."""
    w = params["coef"] / params["scale"]
    d = directions.double()
    return torch.nn.functional.cosine_similarity(w, d, dim=-1).masked_fill(d.norm(dim=-1) == 0, float("nan"))


def direction_cosines(probes: list[list], directions: torch.Tensor) -> torch.Tensor:
    return weight_cosines(probe_parameters(probes), directions)


def best_cell(accuracy: list[list[dict]]) -> tuple[int, int]:
    """(position index, layer) of the highest held-out accuracy; ties go to the earliest layer, then position."""
    cells = [(a["value"], -layer, -p) for p, row in enumerate(accuracy) for layer, a in enumerate(row)]
    _, neg_l, neg_p = max(cells)
    return -neg_p, -neg_l


PARAMETERS = ("mean", "scale", "coef", "intercept", "c")


def summarise_harmfulness_probes(
    own: dict[str, torch.Tensor], original: dict[str, torch.Tensor], directions: torch.Tensor, cell: tuple[int, int]
) -> dict:
    """One model's probe results for the report, at `cell` = (position index, layer) (the original's
    source) and per layer at that position: its own probes' held-out accuracy, the original's
    probes on its activations (transfer), each with the exact McNemar test against the original's
    own probes on the original's activations (the same held-out prompts), and the cosine of its
    probes' weights with its own difference-of-means directions."""
    from .stats import mcnemar_exact

    p, layer = cell
    own_grid = accuracy_grid(own["own_correct"])
    best = best_cell(own_grid)
    cosines = weight_cosines(own, directions)
    out = dict(
        cell=dict(position_index=p, layer=layer),
        own=own_grid[p][layer],
        best=dict(position_index=best[0], layer=best[1], accuracy=own_grid[best[0]][best[1]]),
        own_per_layer=own_grid[p],
        own_map=own_grid,
        cosine=float(cosines[p, layer]),
        cosine_per_layer=[None if math.isnan(c) else round(c, 4) for c in cosines[p].tolist()],
        chosen_c=float(own["c"][p, layer]),
        n_test=int(own["own_correct"].shape[0]),
    )
    if "transfer_correct" in own:
        transfer = accuracy_grid(own["transfer_correct"])
        base = original["own_correct"][:, p, layer].tolist()
        out.update(
            transfer=transfer[p][layer],
            transfer_per_layer=transfer[p],
            tests=dict(
                own=mcnemar_exact(own["own_correct"][:, p, layer].tolist(), base),
                transfer=mcnemar_exact(own["transfer_correct"][:, p, layer].tolist(), base),
            ),
        )
    return out

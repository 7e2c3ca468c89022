"""The weight groups of a safety-attribution study, how two selections of a group agree, and how
far training moves each group.

Groups, per decoder linear weight matrix, from Wei et al.'s importance scores
(compression.attribution; q is the safety fraction, p the utility fraction):

  safety_critical  S(p, q): top-q safety scores minus top-p utility scores (the set difference)
  top_safety       the top-q safety scores
  top_utility      the top-p utility scores
  random           a seeded, uniformly random `random_fraction` (default q) of each matrix: the control

Agreement of a group selected twice (before and after fine-tuning), counted over every matrix:
overlap = |A & B| / |A| (the share of the original set that is still selected; for the top sets
|A| = |B|, so it is also the share of the new set) and Jaccard = |A & B| / |A | B|.

Drift, computed in float32 whatever the model's dtype, from the merged weights W = W0 + dW:
  mean_abs        mean |dW| over the group (absolute; weight units)
  mean_relative   mean |dW| / max(|W0|, eps), eps = eps_fraction * mean |W0| of the matrix. The
                  guard keeps a near-zero initial weight (random weights include some) from making
                  one entry dominate the mean; `guarded` is the share of entries where eps applied.
  norm_ratio      ||dW|| / ||W0|| over the group's entries (Frobenius; no guard needed)
  max_abs         the largest |dW| in the group (exactly 0 for frozen weights)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lm.errors import UserError

from .attribution import PER, Scores, random_mask, top_mask

GROUPS = ("safety_critical", "top_safety", "top_utility", "random")
SCORED_GROUPS = GROUPS[:3]  # the groups that depend on the scores (random does not)

Masks = dict[str, torch.Tensor]  # weight name -> bool mask


@dataclass(frozen=True)
class GroupConfig:
    p: float = 0.03  # top-p utility weights are spared by the set difference
    q: float = 0.03  # top-q safety weights
    per: str = "matrix"  # rank within each matrix (Wei et al.'s code) or within each output row
    random_fraction: float | None = None  # default q: the control is as large as top_safety
    seed: int = 0

    def __post_init__(self):
        for label, value in (("p", self.p), ("q", self.q), ("random_fraction", self.random_fraction)):
            if value is not None and not 0 < value < 1:
                raise UserError(f"{label} must be in (0, 1), got {value}")
        if self.per not in PER:
            raise UserError(f"unknown ranking group {self.per!r}; choose one of {', '.join(PER)}")

    @property
    def random(self) -> float:
        return self.q if self.random_fraction is None else self.random_fraction


def _check_scores(safety: Scores, utility: Scores) -> None:
    if set(safety) != set(utility):
        raise UserError("safety and utility scores cover different weights")
    if not safety:
        raise UserError("no importance scores to select weight groups from")


def scored_groups(
    safety: Scores, utility: Scores, cfg: GroupConfig, names: list[str] | None = None
) -> dict[str, Masks]:
    """{group: {weight name: mask}} for the three score-based groups."""
    _check_scores(safety, utility)
    out: dict[str, Masks] = {g: {} for g in SCORED_GROUPS}
    for name in names if names is not None else sorted(safety):
        s, u = safety[name], utility[name]
        top_s, top_u = top_mask(s, cfg.q, cfg.per), top_mask(u, cfg.p, cfg.per)
        out["safety_critical"][name] = top_s & ~top_u  # set_difference_mask, reusing the two top masks
        out["top_safety"][name] = top_s
        out["top_utility"][name] = top_u
    return out


def random_group(shapes: dict[str, torch.Size], cfg: GroupConfig) -> Masks:
    # One CPU generator walked in sorted-name order: the same seed picks the same weights anywhere.
    generator = torch.Generator().manual_seed(cfg.seed)
    return {
        name: random_mask(shapes[name], cfg.random, generator, "matrix" if cfg.per == "matrix" else "row")
        for name in sorted(shapes)
    }


def weight_groups(safety: Scores, utility: Scores, cfg: GroupConfig) -> dict[str, Masks]:
    """All four groups, keyed as GROUPS."""
    groups = scored_groups(safety, utility, cfg)
    groups["random"] = random_group({n: s.shape for n, s in safety.items()}, cfg)
    return groups


def group_sizes(groups: dict[str, Masks]) -> dict[str, dict]:
    """Selected count and share of all scored weights, per group."""
    out = {}
    for group, masks in groups.items():
        selected = sum(int(m.sum()) for m in masks.values())
        total = sum(m.numel() for m in masks.values())
        out[group] = dict(selected=selected, fraction=selected / total if total else 0.0)
    return out


# --- agreement of two selections -----------------------------------------------------------------


@dataclass
class Agreement:
    before: int  # |A|
    after: int  # |B|
    intersection: int

    @property
    def union(self) -> int:
        return self.before + self.after - self.intersection

    @property
    def overlap(self) -> float:
        return self.intersection / self.before if self.before else float("nan")

    @property
    def jaccard(self) -> float:
        return self.intersection / self.union if self.union else float("nan")

    def to_json(self) -> dict:
        return dict(
            before=self.before,
            after=self.after,
            intersection=self.intersection,
            union=self.union,
            overlap=self.overlap,
            jaccard=self.jaccard,
        )


def agreement(before: Masks, after: Masks) -> Agreement:
    """|A|, |B| and |A & B| summed over every matrix (the same weights in both selections)."""
    if set(before) != set(after):
        raise UserError("the two selections cover different weights")
    a = b = both = 0
    for name, m0 in before.items():
        m1 = after[name]
        if m0.shape != m1.shape:
            raise UserError(f"selections of {name} differ in shape: {tuple(m0.shape)} vs {tuple(m1.shape)}")
        a += int(m0.sum())
        b += int(m1.sum())
        both += int((m0 & m1).sum())
    return Agreement(before=a, after=b, intersection=both)


# --- drift ---------------------------------------------------------------------------------------


@dataclass
class DriftSums:
    """Running sums over a group's entries, so drift is accumulated one matrix at a time."""

    count: int = 0
    abs_sum: float = 0.0
    rel_sum: float = 0.0
    guarded: int = 0
    sq_delta: float = 0.0
    sq_initial: float = 0.0
    max_abs: float = 0.0

    def add(self, w0: torch.Tensor, delta: torch.Tensor, mask: torch.Tensor, eps: float) -> None:
        mask = mask.to(w0.device)
        d = delta.detach().to(w0.device).float()[mask].abs()
        w = w0.detach().float()[mask].abs()
        if not d.numel():
            return
        floor = torch.full_like(w, eps)
        self.count += d.numel()
        self.abs_sum += float(d.double().sum())
        self.rel_sum += float((d / torch.maximum(w, floor)).double().sum())
        self.guarded += int((w < eps).sum())
        self.sq_delta += float(d.double().square().sum())
        self.sq_initial += float(w.double().square().sum())
        self.max_abs = max(self.max_abs, float(d.max()))

    def to_json(self) -> dict:
        n = self.count
        return dict(
            count=n,
            mean_abs=self.abs_sum / n if n else float("nan"),
            mean_relative=self.rel_sum / n if n else float("nan"),
            norm_ratio=(self.sq_delta**0.5) / (self.sq_initial**0.5) if self.sq_initial > 0 else float("nan"),
            max_abs=self.max_abs,
            guarded=self.guarded / n if n else 0.0,
        )


def relative_floor(w0: torch.Tensor, eps_fraction: float) -> float:
    """The relative-drift guard of one matrix: eps_fraction * mean |W0|."""
    return eps_fraction * float(w0.detach().float().abs().mean())


def group_drift(
    initial: dict[str, torch.Tensor],
    deltas: dict[str, torch.Tensor],
    groups: dict[str, Masks],
    eps_fraction: float = 0.1,
) -> dict[str, dict]:
    """Drift statistics of every group (see the module docstring); a matrix without a delta did not move."""
    if eps_fraction <= 0:
        raise UserError(f"the relative-drift guard eps_fraction must be positive, got {eps_fraction}")
    sums = {g: DriftSums() for g in groups}
    for name, w0 in initial.items():
        delta = deltas.get(name)
        if delta is None:
            delta = torch.zeros((), dtype=torch.float32).expand(w0.shape)
        if delta.shape != w0.shape:
            raise UserError(f"the update of {name} has shape {tuple(delta.shape)}, the weight {tuple(w0.shape)}")
        eps = relative_floor(w0, eps_fraction)
        for g, masks in groups.items():
            if name in masks:
                sums[g].add(w0, delta, masks[name], eps)
    return {g: s.to_json() for g, s in sums.items()}

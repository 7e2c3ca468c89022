"""The static baseline: restore changed weights by a fixed ranking, each matrix its share.

Each matrix restores its share of the budget k (in proportion to how many of its weights the
compression changed), highest score first, where the score is the original's Wanda safety score
|W_ij| * ||X_j||_2 on its own refusals (Wei et al. 2024's attribution, compression.attribution).
Ranking within each matrix matters: one global ranking spends the budget on the few matrices whose
scores run largest (measured on the embedded model's set-difference variant: 78% ASR at 40,000
weights within matrices against 86% globally, README). It is computed once, from the original
alone, and never looks at the repaired model: the baseline the anchored search must beat at equal
cost.
"""

from __future__ import annotations

import torch


def matrix_shares(changed: dict[str, torch.Tensor], k: int) -> dict[str, int]:
    """k split over the matrices in proportion to their changed counts (largest remainders, so the
    shares sum to k exactly, capped at what each matrix has)."""
    counts = {n: int(m.sum()) for n, m in changed.items()}
    total = sum(counts.values())
    k = max(0, min(k, total))
    if total == 0 or k == 0:
        return {n: 0 for n in counts}
    exact = {n: k * c / total for n, c in counts.items()}
    shares = {n: int(v) for n, v in exact.items()}
    left = k - sum(shares.values())
    for n in sorted(exact, key=lambda n: -(exact[n] - shares[n]))[:left]:
        shares[n] += 1
    return shares


def within_matrix_masks(
    scores: dict[str, torch.Tensor], changed: dict[str, torch.Tensor], k: int
) -> dict[str, torch.Tensor]:
    """Masks of the top-scoring changed entries of each matrix, its share of k each."""
    out = {}
    for name, share in matrix_shares(changed, k).items():
        if share == 0:
            continue
        where = changed[name].flatten().nonzero().flatten()
        s = scores[name].flatten()[where].float()
        top = where[s.topk(min(share, len(where))).indices]
        m = torch.zeros(changed[name].numel(), dtype=torch.bool)
        m[top] = True
        out[name] = m.view(changed[name].shape)
    return out

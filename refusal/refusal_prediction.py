"""Reading the refusal-prediction probes (refusal.probing) for a report.

A probe that predicts refusal is only informative beyond the base rate: on prompts a model refuses
70% of the time, "always refuses" is 70% accurate. So each model's held-out accuracy is tested
against that majority-class predictor (the majority of its own training labels) on the same
prompts, with the exact McNemar test. For each variant, the prompts the original refused and the
variant answers ("flips") are counted, and for each flip whether the original's probe had flagged
it as answered: on the variant's activations (the representation the original reads now says
"answers") and on the original's own (the prompt was already borderline before compression).
"""

from __future__ import annotations

import torch

from .probes import accuracy_grid, best_cell
from .stats import mcnemar_exact, rate_of


def summarise_refusal_probes(
    own: dict[str, torch.Tensor], original: dict[str, torch.Tensor], cell: tuple[int, int], is_original: bool
) -> dict:
    """One model's refusal-prediction results at `cell` = (position index, layer), per layer at
    that position, and its best cell."""
    p, layer = cell
    y_test = own["test_refused"].bool()
    y_train = own["train_refused"].bool() if "train_refused" in own else None
    out = dict(
        n_train=0 if y_train is None else len(y_train),
        n_test=len(y_test),
        train_refused=None if y_train is None else rate_of(y_train.tolist()),
        test_refused=rate_of(y_test.tolist()),
        fitted="own_pred" in own,
    )
    if y_train is None:
        out["reason"] = "not fitted here: only the original's probe is applied"
    elif "own_pred" in own:
        right = own["own_pred"] == y_test[:, None, None]
        grid = accuracy_grid(right)
        best = best_cell(grid)
        majority = bool(y_train.float().mean() >= 0.5)
        majority_right = (y_test == majority).tolist()
        out.update(
            own=grid[p][layer],
            own_per_layer=grid[p],
            best=dict(position_index=best[0], layer=best[1], accuracy=grid[best[0]][best[1]]),
            majority=dict(predicts="refused" if majority else "answered", accuracy=rate_of(majority_right)),
            vs_majority=mcnemar_exact(right[:, p, layer].tolist(), majority_right),
        )
    else:
        k = int(y_train.sum())
        out["reason"] = (
            f"not fitted: the model refused {k} of {len(y_train)} training prompts, and a probe needs at least 2 "
            "refused and 2 answered ones"
        )
    if is_original:
        return out
    ref_y = original["test_refused"].bool()
    flips = ref_y & ~y_test
    out["flips"] = dict(
        refused_to_answered=int(flips.sum()),
        answered_to_refused=int((~ref_y & y_test).sum()),
        flagged_on_variant=None,
        flagged_on_original=None,
    )
    if "transfer_pred" in own:
        transfer = accuracy_grid(own["transfer_pred"] == y_test[:, None, None])
        out.update(transfer=transfer[p][layer], transfer_per_layer=transfer[p])
    if flips.any():
        # Flagged: the original's probe predicts an answer (no refusal) for the flipped prompt. The
        # same share over all held-out prompts is the base rate a flagged share must be read against.
        if "transfer_pred" in own:
            out["flips"]["flagged_on_variant"] = rate_of((~own["transfer_pred"][flips, p, layer]).tolist())
            out["flips"]["answered_on_variant_all"] = rate_of((~own["transfer_pred"][:, p, layer]).tolist())
        if "own_pred" in original:
            out["flips"]["flagged_on_original"] = rate_of((~original["own_pred"][flips, p, layer]).tolist())
            out["flips"]["answered_on_original_all"] = rate_of((~original["own_pred"][:, p, layer]).tolist())
    return out

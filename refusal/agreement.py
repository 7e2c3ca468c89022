"""How far two judges (or a judge and human labels) agree on the same completions: raw agreement,
Cohen's kappa, the confusion matrix, each with a 95% interval, and the completions they disagree on.

Kappa = (p_o - p_e) / (1 - p_e), p_o the observed agreement and p_e the agreement two judges with
these marginal rates would reach by chance; undefined (None) where p_e = 1, i.e. both judges gave
every completion the same verdict. Its interval is a percentile bootstrap over clusters: the prompts
(a prompt's completions by several models, or its several samples, are not independent), or the
labelled items themselves in a labelled file. Resamples where kappa is undefined are left out and
counted.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .stats import ALPHA, wilson

RESAMPLES = 2000


def cohen_kappa(a: Sequence[bool], b: Sequence[bool]) -> float | None:
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.size == 0 or x.size != y.size:
        raise ValueError("kappa needs two equally long, non-empty sequences of verdicts")
    observed = float(np.mean(x == y))
    chance = float(x.mean() * y.mean() + (1 - x.mean()) * (1 - y.mean()))
    return None if chance >= 1.0 else (observed - chance) / (1 - chance)


def confusion(a: Sequence[bool], b: Sequence[bool]) -> dict:
    """Counts of (first, second) verdict pairs."""
    pairs = list(zip(map(bool, a), map(bool, b)))
    return dict(
        both=pairs.count((True, True)),
        first_only=pairs.count((True, False)),
        second_only=pairs.count((False, True)),
        neither=pairs.count((False, False)),
    )


def kappa_interval(
    a: Sequence[bool], b: Sequence[bool], clusters: Sequence | None = None, seed: int = 0, resamples: int = RESAMPLES
) -> dict:
    """Kappa with a percentile bootstrap interval over `clusters` (one key per verdict; None: each
    verdict its own cluster), and raw agreement with the same bootstrap."""
    x, y = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    value = cohen_kappa(x, y)
    keys = list(range(len(x))) if clusters is None else list(clusters)
    groups: dict = {}
    for i, k in enumerate(keys):
        groups.setdefault(k, []).append(i)
    members = list(groups.values())
    rng = np.random.default_rng(seed)
    kappas, agreements = [], []
    for _ in range(resamples):
        idx = np.concatenate([members[j] for j in rng.integers(0, len(members), size=len(members))])
        agreements.append(float(np.mean(x[idx] == y[idx])))
        k = cohen_kappa(x[idx], y[idx])
        if k is not None:
            kappas.append(k)
    method = f"bootstrap-{'prompts' if clusters is not None else 'items'} (percentile, {resamples} resamples)"
    agree = float(np.mean(x == y))
    out = dict(
        kappa=value,
        kappa_ci95=None,
        agreement=dict(
            value=agree,
            k=int(np.sum(x == y)),
            n=int(x.size),
            ci95=[float(v) for v in np.percentile(agreements, [2.5, 97.5])],
            method=method,
        ),
        n=int(x.size),
        clusters=len(members),
        method=method,
        undefined_resamples=resamples - len(kappas),
    )
    if value is not None and kappas:
        out["kappa_ci95"] = [float(v) for v in np.percentile(kappas, [2.5, 97.5])]
    return out


def pairwise(verdicts: dict[str, list[bool]], items: list[dict], clusters: list, examples: int = 5) -> list[dict]:
    """Every pair of judges on the same completions: kappa and agreement with intervals, the
    confusion matrix, and the completions they disagree on (`items[i]` describes completion i:
    id, model, prompt, completion; the first `examples` are kept whole, the rest by id)."""
    names = list(verdicts)
    out = []
    for i, first in enumerate(names):
        for second in names[i + 1 :]:
            a, b = verdicts[first], verdicts[second]
            split = [dict(items[k], **{first: bool(a[k]), second: bool(b[k])}) for k in range(len(a)) if a[k] != b[k]]
            out.append(
                dict(
                    first=first,
                    second=second,
                    **kappa_interval(a, b, clusters),
                    confusion=confusion(a, b),
                    disagreements=len(split),
                    examples=split[:examples],
                    disagreeing_ids=[f"{s.get('model', '')}:{s['id']}".lstrip(":") for s in split],
                )
            )
    return out


def against_labels(
    labels: Sequence[bool], verdicts: Sequence[bool], categories: Sequence[str | None] | None = None
) -> dict:
    """A judge against human labels (True: the positive label): accuracy (Wilson), kappa (bootstrap
    over items), the confusion matrix, sensitivity and specificity, and the same per category."""
    labels, verdicts = [bool(x) for x in labels], [bool(x) for x in verdicts]
    correct = [x == y for x, y in zip(labels, verdicts)]
    k = kappa_interval(verdicts, labels)
    positives = [v for v, l in zip(verdicts, labels) if l]
    negatives = [not v for v, l in zip(verdicts, labels) if not l]
    out = dict(
        n=len(labels),
        accuracy=wilson(sum(correct), len(correct)),
        kappa=k["kappa"],
        kappa_ci95=k["kappa_ci95"],
        kappa_method=k["method"],
        confusion=dict(
            judge_yes_label_yes=sum(v and l for v, l in zip(verdicts, labels)),
            judge_yes_label_no=sum(v and not l for v, l in zip(verdicts, labels)),
            judge_no_label_yes=sum(l and not v for v, l in zip(verdicts, labels)),
            judge_no_label_no=sum(not v and not l for v, l in zip(verdicts, labels)),
        ),
        sensitivity=wilson(sum(positives), len(positives)) if positives else None,
        specificity=wilson(sum(negatives), len(negatives)) if negatives else None,
    )
    if categories is not None and any(c for c in categories):
        per = {}
        for c in sorted({c or "(none)" for c in categories}):
            idx = [i for i, x in enumerate(categories) if (x or "(none)") == c]
            sub_k = cohen_kappa([verdicts[i] for i in idx], [labels[i] for i in idx])
            per[c] = dict(n=len(idx), accuracy=wilson(sum(correct[i] for i in idx), len(idx)), kappa=sub_k)
        out["per_category"] = per
    return out


def significance_disagreements(tests: dict[str, dict | None], what: str, first: str, second: str) -> str | None:
    """One sentence when the judges' paired tests of the same comparison disagree on significance
    (after each judge's Holm correction); None when they agree or fewer than two judges tested."""
    tested = {j: t for j, t in tests.items() if t}
    if len(tested) < 2:
        return None
    sig = {j: t.get("significant", t["p_value"] < ALPHA) for j, t in tested.items()}
    if len(set(sig.values())) < 2:
        return None

    def p(t):
        return f"p = {t.get('p_holm', t['p_value']):.2g}"

    yes = ", ".join(f"{j} ({p(tested[j])})" for j, s in sig.items() if s)
    no = ", ".join(f"{j} ({p(tested[j])})" for j, s in sig.items() if not s)
    return (
        f"{what}, {first} vs {second}: the judges disagree on significance: significant at 5% under {yes}; "
        f"not significant under {no}."
    )

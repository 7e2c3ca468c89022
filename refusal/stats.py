"""The statistics every reported number carries: intervals for rates, paired tests between models.

A rate is reported as {"value", "k", "n", "ci95", "method"} so anyone can recompute it from k and
n; a paired comparison of two models on the same prompts as {"test": "mcnemar-exact", "b", "c",
"p_value"}. Distributions come from scipy.stats; only Holm's step-down rule is written out.
"""

from __future__ import annotations

import math

import numpy as np

ALPHA = 0.05


def _rate(value: float, k: int, n: int, lo: float, hi: float, method: str) -> dict:
    return dict(value=value, k=int(k), n=int(n), ci95=[float(lo), float(hi)], method=method)


def wilson(k: int, n: int) -> dict:
    """k successes of n with the Wilson score interval (good coverage at small n and near 0 or 1)."""
    if n <= 0:
        raise ValueError("a rate needs at least one trial")
    if not 0 <= k <= n:
        raise ValueError(f"k={k} successes of n={n} trials")
    from scipy.stats import binomtest

    ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=0.95, method="wilson")
    return _rate(k / n, k, n, ci.low, ci.high, "wilson")


def clopper_pearson(k: int, n: int) -> dict:
    """k successes of n with the exact (conservative) Clopper-Pearson interval."""
    if n <= 0:
        raise ValueError("a rate needs at least one trial")
    from scipy.stats import binomtest

    ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=0.95, method="exact")
    return _rate(k / n, k, n, ci.low, ci.high, "clopper-pearson")


def rate_of(outcomes) -> dict:
    """Wilson rate of a sequence of booleans."""
    outcomes = [bool(x) for x in outcomes]
    return wilson(sum(outcomes), len(outcomes))


def bootstrap_mean(values, seed: int = 0, resamples: int = 2000) -> dict:
    """Mean of per-unit values (e.g. per-document correctness) with a percentile bootstrap over units.

    k is the sum (the count of successes when the values are 0/1), n the number of units.
    """
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        raise ValueError("a mean needs at least one value")
    lo, hi = _bootstrap(x[None, :], lambda a, axis: a.mean(axis=axis), seed, resamples)
    return _rate(float(x.mean()), int(round(x.sum())), x.size, lo, hi, "bootstrap-percentile")


def bootstrap_task_mean(per_task: dict[str, list[float]], seed: int = 0, resamples: int = 2000) -> dict:
    """Mean over tasks of each task's mean (the zero-shot average), resampling documents within each task.

    k is the number of correct documents over all tasks, n the number of documents.
    """
    groups = [np.asarray(v, dtype=float) for v in per_task.values()]
    if not groups or any(g.size == 0 for g in groups):
        raise ValueError("a task mean needs at least one document per task")
    rng = np.random.default_rng(seed)
    stats = np.mean([g[rng.integers(0, g.size, size=(resamples, g.size))].mean(axis=1) for g in groups], axis=0)
    lo, hi = np.percentile(stats, [2.5, 97.5])
    value = float(np.mean([g.mean() for g in groups]))
    return _rate(
        value, int(round(sum(g.sum() for g in groups))), sum(g.size for g in groups), lo, hi, "bootstrap-documents"
    )


def bootstrap_cluster_mean(groups, seed: int = 0, resamples: int = 2000) -> dict:
    """Mean over all items of clustered 0/1 outcomes (e.g. 5 samples per prompt), resampling clusters.

    Samples of one prompt are not independent, so a Wilson interval over all samples would be too
    narrow; resampling whole prompts is not.
    """
    k = np.array([sum(bool(v) for v in g) for g in groups], dtype=float)
    m = np.array([len(g) for g in groups], dtype=float)
    if m.size == 0 or m.sum() == 0:
        raise ValueError("a rate needs at least one trial")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, m.size, size=(resamples, m.size))
    stats = k[idx].sum(axis=1) / m[idx].sum(axis=1)
    lo, hi = np.percentile(stats, [2.5, 97.5])
    return _rate(float(k.sum() / m.sum()), int(k.sum()), int(m.sum()), lo, hi, "bootstrap-prompts")


def bootstrap_perplexity(nll_sums, token_counts, seed: int = 0, resamples: int = 2000) -> dict:
    """exp(total NLL / total tokens) with a percentile bootstrap over evaluation windows.

    k and n are not counts here: n is the number of windows, k the number of tokens scored.
    """
    s = np.asarray(nll_sums, dtype=float)
    t = np.asarray(token_counts, dtype=float)
    if s.size == 0:
        raise ValueError("perplexity needs at least one window")
    value = math.exp(s.sum() / t.sum())
    if s.size == 1:
        return _rate(value, int(t.sum()), 1, value, value, "single-window")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, s.size, size=(resamples, s.size))
    stats = np.exp(s[idx].sum(axis=1) / t[idx].sum(axis=1))
    lo, hi = np.percentile(stats, [2.5, 97.5])
    return _rate(value, int(t.sum()), s.size, lo, hi, "bootstrap-windows")


def _bootstrap(data: np.ndarray, statistic, seed: int, resamples: int) -> tuple[float, float]:
    from scipy.stats import bootstrap

    if data.shape[1] < 2 or np.all(data == data.flat[0]):
        v = float(statistic(data[0], axis=-1))
        return v, v
    res = bootstrap(
        (data[0],),
        statistic,
        n_resamples=resamples,
        method="percentile",
        random_state=np.random.default_rng(seed),
        vectorized=True,
    )
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def paired_perplexity_ratio(nll_a, nll_b, token_counts, seed: int = 0, resamples: int = 2000) -> dict:
    """Perplexity of model a over model b on the same windows, exp((NLL_a - NLL_b) / tokens), with
    a percentile bootstrap that resamples windows jointly (so what the windows share cancels) and
    the exact two-sided Wilcoxon signed-rank test of the per-token NLL differences per window."""
    from scipy.stats import wilcoxon

    a, b = np.asarray(nll_a, dtype=float), np.asarray(nll_b, dtype=float)
    t = np.asarray(token_counts, dtype=float)
    if not (a.size == b.size == t.size) or a.size == 0:
        raise ValueError("paired perplexity needs the same non-empty windows for both models")
    value = math.exp((a.sum() - b.sum()) / t.sum())
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, a.size, size=(resamples, a.size))
    ratios = np.exp((a[idx].sum(axis=1) - b[idx].sum(axis=1)) / t[idx].sum(axis=1))
    lo, hi = np.percentile(ratios, [2.5, 97.5]) if a.size > 1 else (value, value)
    diff = (a - b) / t
    p = (
        1.0
        if np.all(diff == 0) or a.size < 2
        else float(wilcoxon(diff, alternative="two-sided", method="exact").pvalue)
    )
    return dict(test="wilcoxon-signed-rank-exact", ratio=value, ci95=[float(lo), float(hi)], n=int(a.size), p_value=p)


def mcnemar_exact(a, b) -> dict:
    """Exact two-sided McNemar test of paired 0/1 outcomes of two models on the same prompts.

    b: prompts where only the first model succeeds, c: where only the second does; the p-value is
    the two-sided binomial test of b against b + c at 1/2 (1.0 without discordant pairs).
    """
    a, b_ = [bool(x) for x in a], [bool(x) for x in b]
    if len(a) != len(b_):
        raise ValueError(f"paired outcomes of different lengths ({len(a)} and {len(b_)})")
    only_a = sum(x and not y for x, y in zip(a, b_))
    only_b = sum(y and not x for x, y in zip(a, b_))
    return dict(test="mcnemar-exact", b=only_a, c=only_b, n=len(a), p_value=_mcnemar_p(only_a, only_b))


def _mcnemar_p(b: int, c: int) -> float:
    if b + c == 0:
        return 1.0
    from scipy.stats import binomtest

    return float(binomtest(b, b + c, 0.5).pvalue)


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error), in the input order."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def add_holm(tests: list[dict]) -> list[dict]:
    """Each test dict gains p_holm (adjusted within this family), significant (p_holm < 0.05) and
    holm_factor: the smallest multiplier Holm could apply to its p given the family's other results,
    the family size less the other significant tests (only those can precede it: a non-significant
    test with a smaller p stops the step-down before it)."""
    adjusted = holm([t["p_value"] for t in tests])
    significant = [p < ALPHA for p in adjusted]
    for t, p, sig in zip(tests, adjusted, significant):
        t["p_holm"] = p
        t["family_size"] = len(tests)
        t["significant"] = sig
        t["holm_factor"] = len(tests) - (sum(significant) - sig)
    return tests


def min_detectable_difference(n: int, holm_factor: int = 1) -> float | None:
    """Smallest paired difference in a rate that an exact McNemar test on n prompts could call
    significant at a Holm step that multiplies p by `holm_factor` (the family size at the first,
    strictest step; 1 at the last): all discordant pairs in one direction. None when no difference
    of n prompts could reach it."""
    for d in range(1, n + 1):
        if holm_factor * _mcnemar_p(d, 0) < ALPHA:
            return d / n
    return None


def detectable_sentence(evaluation: dict, family_size: int, what: str) -> str:
    """What the evaluation's n can detect (describe_prompts' floors), as one sentence; '' without them."""
    first, last = evaluation.get("min_detectable_difference"), evaluation.get("min_detectable_difference_last_step")
    if not first:
        return ""
    sentence = (
        f"With n = {evaluation['n']} and Holm over {family_size} {what}, a paired difference must be at least "
        f"{100 * first:.0f} points to be significant as the family's smallest p-value"
    )
    if last and last < first:  # later Holm steps multiply p by less, so smaller differences can pass there
        sentence += f", and at least {100 * last:.0f} points at Holm's last step"
    return sentence + "."


def _holm_factor(test: dict) -> int:
    return test.get("holm_factor", test.get("family_size", 1))


def _p_text(test: dict) -> str:
    return (
        f"p = {test['p_holm']:.2g} after Holm over {test['family_size']}"
        if "p_holm" in test
        else f"p = {test['p_value']:.2g}"
    )


def describe_change(name_a: str, name_b: str, rate_a: dict, rate_b: dict, test: dict, what: str = "ASR") -> str:
    """One sentence about a paired difference that calls it a change only when the test says so."""
    diff = 100 * (rate_b["value"] - rate_a["value"])
    ps = _p_text(test)
    if test.get("significant", test["p_value"] < ALPHA):
        direction = "rises" if diff > 0 else "falls"
        return (
            f"{what} {direction} from {rate_a['value']:.1%} ({name_a}) to {rate_b['value']:.1%} ({name_b}), "
            f"{diff:+.1f} points ({ps}, McNemar b={test['b']}, c={test['c']})."
        )
    mdd = min_detectable_difference(test["n"], _holm_factor(test))
    floor = (
        f"; with n = {test['n']} only a difference of at least {100 * mdd:.0f} points could be significant"
        if mdd
        else f"; with n = {test['n']} no difference could be significant"
    )
    return f"{what} {name_a} {rate_a['value']:.1%} vs {name_b} {rate_b['value']:.1%} ({diff:+.1f} points): not significant at 5% ({ps}){floor}."


def describe_ratio(
    name_a: str, name_b: str, value_a: float, value_b: float, test: dict, what: str = "Perplexity"
) -> str:
    """One sentence about a paired perplexity ratio (paired_perplexity_ratio of b over a) that calls
    it a change only when the Wilcoxon test, after Holm, says so."""
    lo, hi = test["ci95"]
    ratio = f"ratio {test['ratio']:.3f} [{lo:.3f}, {hi:.3f}]"
    ps = _p_text(test)
    if test.get("significant", test["p_value"] < ALPHA):
        direction = "rises" if test["ratio"] > 1 else "falls"
        return f"{what} {direction} from {value_a:.2f} ({name_a}) to {value_b:.2f} ({name_b}), {ratio} ({ps}, Wilcoxon over {test['n']} windows)."
    # The exact signed-rank test's smallest two-sided p on n pairs is 2 / 2^n (every sign the same).
    smallest = _holm_factor(test) * 2.0 ** (1 - test["n"])
    floor = (
        f"; with {test['n']} windows no difference could be significant (smallest attainable p {min(1.0, smallest):.2g})"
        if smallest >= ALPHA
        else ""
    )
    return f"{what} {name_a} {value_a:.2f} vs {name_b} {value_b:.2f}, {ratio}: not significant at 5% ({ps}){floor}."


def fmt_rate(r: dict | None, digits: int = 1) -> str:
    """'25.0% [17.4, 34.5] (n=100)' for a rate object; '-' for None."""
    if not r:
        return "-"
    lo, hi = r["ci95"]
    return f"{100 * r['value']:.{digits}f}% [{100 * lo:.{digits}f}, {100 * hi:.{digits}f}]"


def fmt_value_ci(r: dict | None, fmt: str = ".2f") -> str:
    """'47.50 [45.1, 50.2]' for a non-percentage estimate (perplexity)."""
    if not r:
        return "-"
    lo, hi = r["ci95"]
    return f"{format(r['value'], fmt)} [{format(lo, fmt)}, {format(hi, fmt)}]"


def fmt_p(test: dict | None) -> str:
    """Holm-adjusted p-value where there is one, with a star when significant."""
    if not test:
        return "-"
    p = test.get("p_holm", test["p_value"])
    return f"{p:.2g}{'*' if test.get('significant', p < ALPHA) else ''}"

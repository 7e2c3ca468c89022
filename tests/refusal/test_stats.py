"""refusal.stats against known values: hand-checked intervals, scipy reference p-values, Holm by hand."""

from __future__ import annotations

import math

import pytest

from refusal import stats


def test_wilson_matches_the_hand_computed_interval():
    # p = 0.5, n = 10, z = 1.95996: centre 0.5, half-width z*sqrt(p(1-p)/n + z^2/4n^2) / (1 + z^2/n)
    z = 1.959963984540054
    half = z * math.sqrt(0.25 / 10 + z * z / 400) / (1 + z * z / 10)
    r = stats.wilson(5, 10)
    assert r["ci95"] == pytest.approx([0.5 - half, 0.5 + half], abs=1e-9)
    assert r["ci95"] == pytest.approx([0.2366, 0.7634], abs=1e-4)
    assert (r["value"], r["k"], r["n"], r["method"]) == (0.5, 5, 10, "wilson")
    # k = 0: lower bound 0, upper z^2 / (n + z^2)
    assert stats.wilson(0, 10)["ci95"] == pytest.approx([0.0, z * z / (10 + z * z)], abs=1e-9)


def test_clopper_pearson_at_zero_successes():
    assert stats.clopper_pearson(0, 10)["ci95"] == pytest.approx([0.0, 1 - 0.025 ** (1 / 10)], abs=1e-9)
    lo, hi = stats.clopper_pearson(5, 10)["ci95"]
    wlo, whi = stats.wilson(5, 10)["ci95"]
    assert lo < wlo and hi > whi  # exact is the conservative one


@pytest.mark.parametrize("k, n", [(-1, 10), (11, 10), (0, 0)])
def test_rates_reject_impossible_counts(k, n):
    with pytest.raises(ValueError):
        stats.wilson(k, n)


def test_mcnemar_exact_against_the_binomial_tail():
    a = [True] * 1 + [False] * 9 + [True] * 5
    b = [False] * 1 + [True] * 9 + [True] * 5
    t = stats.mcnemar_exact(a, b)
    assert (t["b"], t["c"], t["n"], t["test"]) == (1, 9, 15, "mcnemar-exact")
    assert t["p_value"] == pytest.approx(2 * (1 + 10) / 1024)  # two-sided exact binomial, 10 discordant pairs
    assert stats.mcnemar_exact([True, False], [True, False])["p_value"] == 1.0  # no discordant pairs
    assert stats.mcnemar_exact([True] * 3 + [False] * 3, [False] * 3 + [True] * 3)["p_value"] == 1.0
    with pytest.raises(ValueError):
        stats.mcnemar_exact([True], [True, False])


def test_holm_by_hand():
    assert stats.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert stats.holm([0.5, 0.001]) == pytest.approx([0.5, 0.002])
    tests = stats.add_holm([dict(p_value=0.01), dict(p_value=0.04), dict(p_value=0.03)])
    assert [t["significant"] for t in tests] == [True, False, False] and all(t["family_size"] == 3 for t in tests)


def test_min_detectable_difference():
    # All discordant pairs one way: p = 2^(1-d); 2^-5 < 0.05 at d = 6, and 3 * 2^-6 < 0.05 at d = 7.
    assert stats.min_detectable_difference(100) == pytest.approx(0.06)
    assert stats.min_detectable_difference(100, holm_factor=3) == pytest.approx(0.07)
    assert stats.min_detectable_difference(4) is None


def test_holm_factor_counts_the_significant_tests_that_can_precede_a_test():
    # Holm over 4: 3e-15 passes the first step (x4), 0.0156 the second (x3); 0.0625 then faces x2.
    tests = stats.add_holm([dict(p_value=3e-15), dict(p_value=2 * 0.5**7), dict(p_value=0.0625), dict(p_value=0.5)])
    assert [t["significant"] for t in tests] == [True, True, False, False]
    assert [t["holm_factor"] for t in tests] == [3, 3, 2, 2]
    # The repair run of 2026-12-06: 0 / 7 discordant pairs on 100 prompts was significant in that
    # family (p_holm 0.047), below the 8 points Holm's first step over 4 needs, so a sentence about a
    # non-significant neighbour must not claim 8 points as its floor.
    assert tests[1]["p_holm"] == pytest.approx(0.046875)
    neighbour = dict(tests[2], n=100, b=3, c=8)
    text = stats.describe_change("compressed", "targeted", dict(value=0.9), dict(value=0.85), neighbour)
    assert "only a difference of at least 7 points could be significant" in text  # 2 * 2^-6 = 0.031 < 0.05
    assert stats.min_detectable_difference(100, 4) == pytest.approx(0.08)


def test_detectable_sentence_gives_the_first_and_last_holm_step():
    ev = dict(n=100, min_detectable_difference=0.08, min_detectable_difference_last_step=0.06)
    text = stats.detectable_sentence(ev, 4, "comparisons")
    assert text == (
        "With n = 100 and Holm over 4 comparisons, a paired difference must be at least 8 points to be "
        "significant as the family's smallest p-value, and at least 6 points at Holm's last step."
    )
    assert stats.detectable_sentence({}, 4, "comparisons") == ""


def test_bootstraps_are_seeded_and_cover_the_estimate():
    x = [1.0] * 50 + [0.0] * 50
    a, b = stats.bootstrap_mean(x, seed=3), stats.bootstrap_mean(x, seed=3)
    assert a == b and a["value"] == 0.5 and a["k"] == 50 and a["n"] == 100
    assert a["ci95"][0] < 0.5 < a["ci95"][1]
    assert a["ci95"] == pytest.approx(stats.wilson(50, 100)["ci95"], abs=0.03)  # both about +-0.1
    assert stats.bootstrap_mean([1.0] * 5)["ci95"] == [1.0, 1.0]

    tasks = {"a": [1, 1, 1, 0], "b": [0, 0, 0, 0, 0, 0, 1, 1]}
    r = stats.bootstrap_task_mean(tasks)
    assert r["value"] == pytest.approx((0.75 + 0.25) / 2) and (r["k"], r["n"]) == (5, 12)
    assert r["ci95"][0] <= r["value"] <= r["ci95"][1]

    groups = [[True] * 5, [False] * 5, [True, False, True, False, True]]
    c = stats.bootstrap_cluster_mean(groups)
    assert c["value"] == pytest.approx(8 / 15) and c["n"] == 15 and c["method"] == "bootstrap-prompts"


def test_bootstrap_perplexity_is_exp_of_the_token_mean():
    nll, tokens = [100.0, 120.0, 90.0], [50, 50, 50]
    r = stats.bootstrap_perplexity(nll, tokens)
    assert r["value"] == pytest.approx(math.exp(310 / 150))
    assert r["ci95"][0] <= r["value"] <= r["ci95"][1] and r["n"] == 3


def test_describe_change_calls_a_change_only_when_significant():
    before, after = stats.wilson(10, 100), stats.wilson(40, 100)
    sig = stats.add_holm([dict(stats.mcnemar_exact([False] * 100, [True] * 30 + [False] * 70))])[0]
    text = stats.describe_change("compressed", "AIRD", before, after, dict(sig, b=sig["c"], c=sig["b"]))
    assert "rises" in text and "+30.0 points" in text
    flat = stats.add_holm([stats.mcnemar_exact([True, False] * 5, [False, True] * 5)])[0]
    text = stats.describe_change("compressed", "AIRD", stats.wilson(5, 10), stats.wilson(5, 10), flat)
    assert "not significant at 5%" in text and "rises" not in text


def test_formatting():
    assert stats.fmt_rate(stats.wilson(5, 10)) == "50.0% [23.7, 76.3]"
    assert stats.fmt_rate(None) == "-"
    assert stats.fmt_p(dict(p_value=0.001, p_holm=0.003, significant=True)) == "0.003*"
    assert stats.fmt_value_ci(dict(value=1.0, ci95=[0.5, 2.0])) == "1.00 [0.50, 2.00]"


def test_paired_perplexity_ratio_against_a_direct_computation():
    from scipy.stats import wilcoxon

    from refusal.stats import paired_perplexity_ratio

    a, b, t = [700.0, 650.0, 720.0, 690.0, 705.0], [690.0, 652.0, 700.0, 680.0, 690.0], [511] * 5
    r = paired_perplexity_ratio(a, b, t)
    assert r["ratio"] == pytest.approx(math.exp((sum(a) - sum(b)) / sum(t)))
    assert r["ci95"][0] <= r["ratio"] <= r["ci95"][1] and r["n"] == 5
    assert r["p_value"] == pytest.approx(wilcoxon([(x - y) / 511 for x, y in zip(a, b)], method="exact").pvalue)
    assert r["p_value"] == pytest.approx(2 * 2 / 32)  # one negative difference of rank 1 of 5: P(W <= 1) * 2 = 4/32
    same = paired_perplexity_ratio(a, a, t)
    assert same["ratio"] == 1.0 and same["ci95"] == [1.0, 1.0] and same["p_value"] == 1.0
    with pytest.raises(ValueError):
        paired_perplexity_ratio(a, b[:3], t)


def test_describe_ratio_calls_a_change_only_when_significant_and_says_when_none_could_be():
    a, b, t = [700.0] * 8, [650.0] * 8, [511] * 8
    worse = stats.add_holm([stats.paired_perplexity_ratio(a, b, t)])[0]  # a over b: every window worse
    assert worse["p_value"] == pytest.approx(2 / 2**8)
    text = stats.describe_ratio("original", "pruned", 40.0, 44.0, worse)
    assert "rises from 40.00 (original) to 44.00 (pruned)" in text and "Wilcoxon over 8 windows" in text
    # The same eight windows in a family of nine: the smallest Holm p is 9 * 2 / 256 = 0.07.
    family = stats.add_holm([stats.paired_perplexity_ratio(a, b, t) for _ in range(9)])
    text = stats.describe_ratio("original", "pruned", 40.0, 44.0, family[0])
    assert "not significant at 5%" in text and "no difference could be significant (smallest attainable p 0.07)" in text

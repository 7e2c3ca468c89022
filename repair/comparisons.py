"""The repair table's paired comparisons: exact McNemar tests of each repair against the compressed
model, of the anchored repair against AIRD, the original and the static baseline at the same cost,
and of the compressed model against the original, Holm-corrected within each measure and judge;
perplexity by the exact Wilcoxon test of the per-window differences (Holm over the same pairs); and
the sentences read from them."""

from __future__ import annotations

from refusal.judges import JUDGE_NAMES
from refusal.measure import paired, paired_perplexity

from .report import LABELS

# The paired comparisons of the repair table: (first, second), the test asks whether they differ.
COMPARISONS = (
    ("aird", "compressed"),
    ("anchored", "compressed"),
    ("anchored", "aird"),
    ("anchored", "original"),
    ("static", "anchored"),
    ("anchored_at_aird", "aird"),
    ("targeted", "compressed"),
    ("targeted", "aird"),
    ("compressed", "original"),
)


def paired_tests(evals: dict) -> dict:
    """Exact McNemar tests per measure and judge; Holm within each family (one measure, one judge)."""
    from refusal.stats import add_holm

    out = {}
    measures = {f"asr_{s}": ("jailbroken", f"asr_{s}") for s in ("vanilla", "adv_suffix")} | {
        "over_refusal": ("refused", "harmless")
    }
    for name, (outcome, key) in measures.items():
        by_judge = {}
        for judge in JUDGE_NAMES:
            family = []
            for a, b in COMPARISONS:
                if a in evals and b in evals and key in evals[a] and key in evals[b]:
                    t = paired(evals[a][key], evals[b][key], judge, outcome)
                    if t is not None:
                        family.append(dict(t, first=a, second=b))
            if family:
                by_judge[judge] = add_holm(family)
        if by_judge:
            out[name] = by_judge
    family = []
    for a, b in COMPARISONS:
        if a in evals and b in evals and "perplexity" in evals[a] and "perplexity" in evals[b]:
            t = paired_perplexity(evals[a]["perplexity"], evals[b]["perplexity"])
            if t is not None:
                family.append(dict(t, first=a, second=b))
    if family:
        out["perplexity"] = {"wilcoxon": add_holm(family)}
    return out


def findings(rows: dict, tests: dict) -> list[str]:
    """The report's sentences on the repairs (Arditi judge), each a change only where the test says so."""
    from refusal.stats import describe_change, describe_ratio

    out = []
    for name, measure_key, what in (
        ("asr_vanilla", ("asr", "vanilla"), "vanilla ASR"),
        ("over_refusal", ("over_refusal",), "over-refusal"),
    ):
        for t in tests.get(name, {}).get("arditi2024", []):

            def rate(state):
                r = rows[state]["rates"][measure_key[0]]
                return (r[measure_key[1]] if len(measure_key) > 1 else r)["arditi2024"]

            # Read as a change from the second state to the first: b counts prompts true only in the first.
            flipped = dict(t, b=t["c"], c=t["b"])
            out.append(
                describe_change(
                    LABELS[t["second"]], LABELS[t["first"]], rate(t["second"]), rate(t["first"]), flipped, what
                )
            )
    for t in tests.get("perplexity", {}).get("wilcoxon", []):
        # The test's ratio is the first state's perplexity over the second's.
        out.append(
            describe_ratio(
                LABELS[t["second"]],
                LABELS[t["first"]],
                rows[t["second"]]["perplexity"],
                rows[t["first"]]["perplexity"],
                t,
            )
        )
    return out


def hollow_section(evals: dict) -> dict:
    """Each state's refusals under Arditi et al.'s judge that go on to comply (refusal.hollow), its
    strict ASR (no clean refusal), and exact McNemar tests of the strict ASR over the repair
    table's comparisons (Holm over them): the keyword judges count "I'm sorry, I'll ..." as a refusal."""
    from refusal.hollow import hollow_reading, strict_jailbroken
    from refusal.judges import judges
    from refusal.stats import add_holm, mcnemar_exact

    arditi = judges()[1]
    states = {name: e["asr_vanilla"] for name, e in evals.items() if "asr_vanilla" in e}
    family = []
    for a, b in COMPARISONS:
        if a in states and b in states:
            ids_a = [r["id"] for r in states[a]["records"]]
            if ids_a != [r["id"] for r in states[b]["records"]]:
                continue  # not the same prompts: no paired test
            t = mcnemar_exact(strict_jailbroken(states[a], arditi), strict_jailbroken(states[b], arditi))
            family.append(dict(t, first=a, second=b))
    return dict(
        states={name: hollow_reading(r, arditi) for name, r in states.items()}, tests=add_holm(family) if family else []
    )

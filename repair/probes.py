"""What a repair restored, read by probes: recognition of harm, or only the step from it to refusal?

Per evaluated state (original, compressed, AIRD, targeted), at the original's source: the state's
own harmfulness probe and the original's applied unchanged (transfer), each tested against the
original's probe on the original (exact McNemar, Holm over the states); and the original's
refusal-prediction probe read on the state's activations against the state's own held-out
verdicts, with the prompts the original refused and the state answers, and how many of those the
original's probe flagged. A repair that brings transfer accuracy back restored the representation;
one that brings refusals back with transfer unchanged restored the readout. repair.report renders it.
"""

from __future__ import annotations

from refusal.probes import summarise_harmfulness_probes
from refusal.refusal_prediction import summarise_refusal_probes
from refusal.stats import add_holm


def summarise_states(evals: dict, cell: tuple[int, int]) -> dict | None:
    """{state: {harmfulness, refusal}} for every state with probes; None when the probes were off."""
    original = evals["original"]
    if "probes" not in original:
        return None
    out = {}
    for name, e in evals.items():
        if "probes" not in e:
            continue
        row = dict(
            harmfulness=summarise_harmfulness_probes(e["probes"], original["probes"], e["directions_tensor"], cell)
        )
        if "refusal_probes" in e:
            row["refusal"] = summarise_refusal_probes(
                e["refusal_probes"], original["refusal_probes"], cell, name == "original"
            )
        out[name] = row
    for test in ("own", "transfer"):
        family = [r["harmfulness"]["tests"][test] for r in out.values() if r["harmfulness"].get("tests")]
        if family:
            add_holm(family)
    return out

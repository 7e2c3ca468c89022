"""The main report's key findings on a repair whose refusals go on to comply (refusal.hollow)."""

from __future__ import annotations

from experiments.compare_refusal.key_findings import key_findings
from refusal.stats import wilson


def _rates(asr_k: int, over_k: int) -> dict:
    return dict(
        asr=dict(vanilla=dict(arditi2024=wilson(asr_k, 100))), over_refusal=dict(arditi2024=wilson(over_k, 100))
    )


def _report(hollow_k: int) -> dict:
    variant = "setdiff-wanda:p=0.01,q=0.01"
    hollow_states = dict(
        compressed=dict(refused=wilson(10, 100), hollow=wilson(0, 100), strict_asr=wilson(90, 100)),
        anchored=dict(refused=wilson(68, 100), hollow=wilson(hollow_k, 100), strict_asr=wilson(32 + hollow_k, 100)),
    )
    repair = dict(
        states=dict(
            original=dict(rates=_rates(37, 10)),
            compressed=dict(rates=_rates(90, 0)),
            anchored=dict(rates=_rates(32, 10), restored=6964),
        ),
        tests=dict(
            asr_vanilla=dict(
                arditi2024=[
                    dict(
                        first="anchored",
                        second="compressed",
                        p_value=1e-17,
                        p_holm=4e-17,
                        significant=True,
                        family_size=6,
                        holm_factor=3,
                    )
                ]
            )
        ),
        hollow=dict(
            states=hollow_states,
            tests=[
                dict(
                    first="anchored",
                    second="compressed",
                    b=7,
                    c=14,
                    p_value=0.19,
                    p_holm=0.19,
                    significant=False,
                    family_size=5,
                    holm_factor=1,
                )
            ],
        ),
    )
    return dict(
        config=dict(size="cpu", max_new_tokens=128, n_train=128),
        variants=[dict(variant="original"), dict(variant=variant)],
        repairs={variant: repair},
    )


def test_a_repair_with_hollow_refusals_is_reported_with_its_strict_asr():
    text = "\n".join(key_findings(_report(51)))
    assert "restoring 6,964 weights" in text
    assert "51 of its 68 refusals go on to comply" in text and "83.0%" in text
    assert "not significant at 5% against the compressed model" in text


def test_clean_refusals_add_nothing():
    assert "go on to comply" not in "\n".join(key_findings(_report(0)))

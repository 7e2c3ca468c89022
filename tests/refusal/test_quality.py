"""Single-direction quality must agree with the batched candidate scores selection uses."""

from __future__ import annotations

import pytest
import torch

from lm.errors import UserError
from refusal.candidate_scores import batch_plan, score_candidates
from refusal.direction import candidate_directions
from refusal.quality import direction_quality
from refusal.score import refusal_tokens
from tests.refusal.test_selection import HARMFUL, HARMLESS


def test_direction_quality_equals_candidate_scores(tiny_pair):
    model, tokenizer = tiny_pair
    ids = refusal_tokens(tokenizer)
    directions = candidate_directions(model, tokenizer, HARMFUL, HARMLESS, batch_size=5)["directions"]
    harmful, harmless = HARMFUL[:4], HARMLESS
    # One prompt batch each, so padding (and hence float rounding) is the same in both paths.
    max_rows = max(len(harmful), len(harmless)) * 4
    scores = score_candidates(model, tokenizer, directions, harmful, harmless, ids, max_rows=max_rows)
    batch = max(batch_plan(len(harmful), max_rows)[0], batch_plan(len(harmless), max_rows)[0])
    for pos, layer in ((-1, 2), (0, 1), (-2, 3)):
        q = direction_quality(model, tokenizer, directions[pos, layer], layer, harmful, harmless, ids, batch_size=batch)
        i = pos % directions.shape[0]
        assert q.bypass == pytest.approx(float(scores.bypass[i, layer]), abs=1e-5)
        assert q.induce == pytest.approx(float(scores.induce[i, layer]), abs=1e-5)
        assert q.kl == pytest.approx(float(scores.kl[i, layer]), abs=1e-5)
        assert q.baseline_harmful == pytest.approx(scores.baseline_harmful, abs=1e-6)
        assert q.refusal_removed == pytest.approx(q.baseline_harmful - q.bypass)
        # Each mean carries a bootstrap interval over its prompts (the quality figure's error bars).
        for key, n in (("bypass", len(harmful)), ("induce", len(harmless)), ("kl", len(harmless))):
            ci = q.ci95[key]
            assert (
                ci["n"] == n
                and ci["value"] == pytest.approx(getattr(q, key), rel=1e-5, abs=1e-6)
                and ci["ci95"][0] <= ci["value"] <= ci["ci95"][1]
            )


def test_direction_quality_rejects_bad_input(tiny_qwen2):
    model, tokenizer = tiny_qwen2
    ids = refusal_tokens(tokenizer)
    with pytest.raises(UserError):
        direction_quality(model, tokenizer, torch.zeros(model.config.hidden_size), 1, HARMFUL, HARMLESS, ids)
    with pytest.raises(UserError):
        direction_quality(model, tokenizer, torch.ones(model.config.hidden_size), 1, [], HARMLESS, ids)


def test_source_shift_figure_lists_a_variant_without_a_source():
    from refusal.compare import source_shift_figure

    fig = source_shift_figure(
        {"original": (-2, 17), "wanda:0.5": (-1, 16), "wanda:0.7": None}, 24, "t", reference="original"
    )
    assert list(fig.data[0].y) == ["original", "wanda:0.5"] and list(fig.data[0].x) == [17, 16]
    notes = [a.text for a in fig.layout.annotations]
    assert any("no candidate passes" in t for t in notes) and any("original" in t for t in notes)
    assert list(fig.layout.yaxis.categoryarray) == ["wanda:0.7", "wanda:0.5", "original"]

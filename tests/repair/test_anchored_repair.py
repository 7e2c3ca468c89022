"""repair.anchored and what it stands on: the anchor loss, units and their costs, the static
baseline, the stop rule, rollback and bisection, the restoration order; on tiny random models."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from compression.calibration import CalibrationConfig, calibration_set
from compression.variants import build_variant, parse_variant
from lm.architecture import decoder_matrices
from lm.errors import UserError
from refusal.stats import wilson
from repair.anchor import AnchorConfig, anchor_losses, build_anchor, post_instruction_positions, relative_distance
from repair.anchored import (
    AnchoredConfig,
    AnchoredSearch,
    best_point,
    changed_masks,
    restoration_gains,
    total_gains,
)
from repair.restoration_order import RestorationOrder
from repair.restore import count, restore_entries
from repair.static_ranking import matrix_shares, within_matrix_masks
from repair.units import UnitLayout, layout_for, rank_units, unit_count, unit_mask, unit_of, unit_sums
from repair.validation import harmless_worse, reaches_original
from tests.tiny import build_model, build_tokenizer


@pytest.fixture(scope="module")
def pair():
    tokenizer = build_tokenizer("chatml")
    original = build_model("qwen2", tokenizer, seed=0, hidden=64, layers=3)
    cal = calibration_set(tokenizer, CalibrationConfig(n_samples=8, seed=0))
    pruned = build_variant(original, parse_variant("wanda:0.5"), cal)
    return original, pruned, tokenizer


@pytest.fixture(scope="module")
def anchor(pair):
    original, _, tokenizer = pair
    return build_anchor(
        original, tokenizer, AnchorConfig(n_harmful=6, n_harmless=6, reply_tokens=6, batch_size=4), source_layer=1
    )


def _reading(harmful: int, harmless: int, kl: float = 0.1, n: int = 20) -> dict:
    return dict(
        refusal_harmful=wilson(harmful, n), refusal_harmless=wilson(harmless, n), kl_original=kl, kl_compressed=0.0
    )


# --- the anchor loss ---------------------------------------------------------------------------


def test_anchor_loss_falls_as_weights_return_to_the_original(pair, anchor):
    """The entries the first-order gains rank highest lower the loss when restored, and restoring
    everything gives the original's loss, with the residual-stream term gone."""
    original, pruned, _ = pair
    model = copy.deepcopy(pruned)
    names = list(decoder_matrices(model))
    gains, losses = restoration_gains(model, original, anchor, names)
    assert losses["harmful"] + losses["harmless"] == pytest.approx(anchor_losses(model, anchor)["total"], rel=1e-4)
    total = {n: gains["harmful"][n] + gains["harmless"][n] for n in names}
    best = rank_units(
        total, changed_masks(model, original, names), {n: UnitLayout("weight") for n in names}, budget=200
    ).take(200)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters() if n in names}
    before = anchor_losses(model, anchor)["total"]
    restore_entries(model, original, best.masks(shapes, {n: UnitLayout("weight") for n in names}))
    after = anchor_losses(model, anchor)["total"]
    restore_entries(model, original, changed_masks(pruned, original, names))
    full = anchor_losses(model, anchor)["total"]
    assert before > after and before > full
    assert full == pytest.approx(anchor_losses(original, anchor)["total"], rel=1e-5)


def test_relative_distance_and_positions():
    t = torch.ones(2, 3, 4, 8)
    assert float(relative_distance(t, t)) == 0
    assert float(relative_distance(2 * t, t)) == pytest.approx(2.0)  # two rows, each (2-1)^2 / 1
    assert post_instruction_positions(torch.tensor([5, 3]), 3).tolist() == [[2, 3, 4], [0, 1, 2]]


def test_anchor_reads_replies_and_the_residual_after_the_source(anchor, pair):
    original = pair[0]
    assert anchor.layers == [1, 2] and anchor.n_tokens["harmful"] > 0 and anchor.n_tokens["harmless"] > 0
    harmful = [b for b in anchor.batches if b["kind"] == "harmful"]
    assert harmful and all(b["target"].shape[1] == 2 for b in harmful)
    assert anchor_losses(original, anchor)["total"] > 0
    # The decision point: the original's first-token distribution, against which the original itself has KL 0.
    from lm.architecture import backbone
    from repair.anchor import first_token_kl, first_token_logprobs

    b = anchor.batches[0]
    assert b["first"].shape == (b["input_ids"].shape[0], len(pair[2]))
    with torch.no_grad():
        out = backbone(original)(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        mine = first_token_logprobs(original, out.last_hidden_state, b["prompt_len"])
        assert float(first_token_kl(mine, b["first"])) == pytest.approx(0, abs=1e-4)
        assert float(first_token_kl(mine.roll(1, dims=-1), b["first"])) > 0.1


def test_refusals_only_anchor_reads_the_originals_clean_refusals(pair, monkeypatch):
    """harmful_replies='refusals' keeps the harmful prompts the original declines cleanly; an
    apology followed by compliance and a plain answer are dropped, harmless prompts are untouched."""
    import compression.attribution
    from repair.anchor import refusal_pairs

    replies = {
        "a": "I'm sorry, but I can't assist with that.",
        "b": "I'm sorry, I'll create it. Here's how: 1. Open",
        "c": "Sure, here is a plan.",
    }
    assert refusal_pairs([(k, r) for k, r in replies.items()]) == [("a", replies["a"])]
    original, _, tokenizer = pair

    def own_replies(model, tok, instructions, max_new_tokens, seed=0):
        return [(i, replies.get(i, "Paris is the capital.")) for i in instructions]

    monkeypatch.setattr(compression.attribution, "own_replies", own_replies)
    cfg = AnchorConfig(n_harmful=3, n_harmless=2, reply_tokens=6, batch_size=4, harmful_replies="refusals")
    built = build_anchor(
        original, tokenizer, cfg, source_layer=1, instructions=dict(harmful=["a", "b", "c"], harmless=["x", "y"])
    )
    assert built.n_sequences == dict(harmful=1, harmless=2) and built.harmful_replies == "refusals"
    # An original that declines nothing cleanly (a random model) is anchored on all its replies, and says so.
    said = []
    fallback = build_anchor(
        original, tokenizer, cfg, 1, instructions=dict(harmful=["b", "c"], harmless=["x"]), log=said.append
    )
    assert fallback.n_sequences["harmful"] == 2 and fallback.harmful_replies.startswith("all")
    assert "declined none of 2 harmful training prompts cleanly" in said[0]
    everything = AnchorConfig(n_harmful=3, n_harmless=2, reply_tokens=6, batch_size=4, harmful_replies="all")
    assert (
        build_anchor(
            original, tokenizer, everything, 1, instructions=dict(harmful=["a", "b", "c"], harmless=["x"])
        ).n_sequences["harmful"]
        == 3
    )
    with pytest.raises(UserError, match="harmful_replies"):
        AnchorConfig(harmful_replies="some")
    assert AnchoredConfig().anchor().harmful_replies == "refusals"


def test_harmless_agree_restores_only_weights_that_do_not_hurt_the_harmless_side(pair, anchor):
    """With harmless_agree a weight whose restoration the harmless terms alone predict to hurt is
    never taken, however large its harmful gain; the search's first step restores none of them."""
    gains = dict(harmful=dict(w=torch.tensor([5.0, 1.0, -1.0])), harmless=dict(w=torch.tensor([-0.5, 0.2, 0.3])))
    assert total_gains(gains)["w"].tolist() == pytest.approx([4.5, 1.2, -0.7])
    assert total_gains(gains, harmless_agree=True)["w"].tolist() == pytest.approx([0.0, 1.2, -0.7])
    assert "harmless_agree" not in AnchoredConfig().to_json()
    assert AnchoredConfig(harmless_agree=True).to_json()["harmless_agree"] is True

    original, pruned, tokenizer = pair
    model = copy.deepcopy(pruned)
    names = list(decoder_matrices(model))
    g, _ = restoration_gains(model, original, anchor, names)
    hurt = {n: g["harmless"][n] < 0 for n in names}
    cfg = AnchoredConfig(step=0.05, max_steps=1, rollback=0, bisect_steps=0, harmless_agree=True)
    layouts = {n: UnitLayout("weight") for n in names}

    class ReachesAtOnce:  # the first step reaches the original, so the search keeps all of it
        def read(self, model):
            return type("R", (), {"to_json": lambda self: _reading(10, 0)})()

    search = AnchoredSearch(model, original, anchor, ReachesAtOnce(), cfg, layouts)
    assert search.run(_reading(10, 0), _reading(0, 0))["reached"]
    masks = search.masks()
    assert count(masks) > 0
    assert not any(bool((masks[n] & hurt[n]).any()) for n in masks)


# --- units -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "layout, n_units",
    [
        (UnitLayout("weight"), 24),
        (UnitLayout("row"), 4),
        (UnitLayout("row", 2), 2),
        (UnitLayout("column", 3), 2),
        (UnitLayout("matrix"), 1),
    ],
)
def test_unit_sums_masks_and_indices_agree(layout, n_units):
    shape = (4, 6)
    values = torch.arange(24, dtype=torch.float32).view(shape)
    sums = unit_sums(values, layout)
    assert len(sums) == n_units == unit_count(shape, layout)
    assert float(sums.sum()) == float(values.sum())
    ids = unit_of(torch.arange(24), shape, layout)
    for u in range(n_units):
        mask = unit_mask(torch.tensor([u]), shape, layout)
        assert float(values[mask].sum()) == float(sums[u])
        assert mask.flatten().nonzero().flatten().tolist() == (ids == u).nonzero().flatten().tolist()


def test_heads_group_attention_rows_and_output_columns():
    assert layout_for("model.layers.0.self_attn.q_proj.weight", (64, 64), "head", 16) == UnitLayout("row", 16)
    assert layout_for("model.layers.0.self_attn.o_proj.weight", (64, 64), "head", 16) == UnitLayout("column", 16)
    assert layout_for("model.layers.0.mlp.up_proj.weight", (128, 64), "head", 16) == UnitLayout("row")
    assert layout_for("model.layers.0.mlp.up_proj.weight", (128, 64), "matrix", 16) == UnitLayout("matrix")
    assert layout_for("model.layers.0.mlp.up_proj.weight", (128, 64), "weight", 16) == UnitLayout("weight")


def test_rank_units_orders_by_gain_per_weight_and_fills_the_budget():
    scores = {"a": torch.tensor([[4.0, 0.0], [1.0, 1.0]]), "b": torch.tensor([[3.0, 3.0], [-1.0, 5.0]])}
    remaining = {n: torch.ones(2, 2, dtype=torch.bool) for n in scores}
    rows = {n: UnitLayout("row") for n in scores}
    ranked = rank_units(scores, remaining, rows, budget=4)
    # per weight: a0 2.0, a1 1.0, b0 3.0, b1 2.0 -> b0, then a0 / b1 (tie: stable order keeps a first), then a1
    assert [(ranked.names[m], i) for m, i in zip(ranked.matrix.tolist(), ranked.index.tolist())][:2] == [
        ("b", 0),
        ("a", 0),
    ]
    assert (
        len(ranked.take(3)) == 2 and int(ranked.take(3).weights.sum()) == 4
    )  # the unit crossing the budget is included
    # Restored entries no longer count, and a unit with nothing left drops out.
    remaining["b"][0] = False
    assert ("b", 0) not in [
        (ranked.names[m], i)
        for m, i in zip(
            *(
                x.tolist()
                for x in (rank_units(scores, remaining, rows, 4).matrix, rank_units(scores, remaining, rows, 4).index)
            )
        )
    ]


def test_byte_costs_prefer_matrices_already_stored_at_full_precision():
    scores = {"a": torch.tensor([[1.0, 1.0]]), "b": torch.tensor([[5.0, 5.0]])}
    remaining = {n: torch.ones(1, 2, dtype=torch.bool) for n in scores}
    weights = {n: UnitLayout("weight") for n in scores}
    costs = {"a": 1000, "b": 1000}
    first = rank_units(scores, remaining, weights, budget=1, matrix_bytes=costs)
    assert first.names[int(first.matrix[0])] == "b"  # same cost, larger gain
    touched = rank_units(scores, remaining, weights, budget=1, matrix_bytes=costs, touched={"a"})
    assert touched.names[int(touched.matrix[0])] == "a"  # a's matrix is already paid for: 1 / 1 beats 5 / 1001


# --- static baseline ---------------------------------------------------------------------------


def test_static_ranking_gives_each_matrix_its_share_best_first():
    changed = {"a": torch.tensor([[True, True, True, False]]), "b": torch.tensor([[True, False, False, False]])}
    assert matrix_shares(changed, 2) == {"a": 2, "b": 0} and sum(matrix_shares(changed, 3).values()) == 3
    scores = {"a": torch.tensor([[1.0, 9.0, 5.0, 100.0]]), "b": torch.tensor([[2.0, 0.0, 0.0, 0.0]])}
    masks = within_matrix_masks(scores, changed, 2)
    assert masks["a"].tolist() == [[False, True, True, False]]  # 100 is unchanged: never restored
    assert count(within_matrix_masks(scores, changed, 10)) == 4


# --- stop rule, best point, rollback trigger ---------------------------------------------------


def test_stop_rule_needs_harmful_refusal_at_the_original_and_harmless_not_above_it():
    original = _reading(12, 2)  # 60% [39, 78] harmful, 10% [3, 30] harmless
    assert reaches_original(_reading(12, 2), original) and reaches_original(_reading(14, 2), original)
    assert not reaches_original(_reading(9, 2), original)  # 45%: inside the interval, below the point
    assert reaches_original(_reading(9, 2), original, "interval")  # ... which the interval aim accepts
    assert not reaches_original(_reading(6, 2), original, "interval")  # 30%: below the interval
    assert not reaches_original(_reading(15, 8), original)  # 40% harmless: above the original's interval
    assert not reaches_original(_reading(15, 8), original, "interval")
    assert harmless_worse(_reading(9, 8), _reading(9, 2), original, 0.25)
    assert harmless_worse(_reading(9, 2, kl=0.2), _reading(9, 2, kl=0.1), original, 0.25)
    assert not harmless_worse(_reading(9, 2, kl=0.11), _reading(9, 2, kl=0.1), original, 0.25)


def test_best_point_without_reaching_keeps_the_best_admissible_state():
    original = _reading(12, 2)
    points = [
        dict(_reading(2, 2), restored=0),
        dict(_reading(7, 2), restored=10),
        dict(_reading(9, 9), restored=20),
        dict(_reading(7, 2), restored=30),
        dict(_reading(8, 1), restored=40, undone=True),
    ]
    assert best_point(points, original) == 1  # 20 over-refuses, 30 costs more for the same, 40 was rolled back


# --- the search --------------------------------------------------------------------------------


class ScriptedValidator:
    """Readings as a function of the restored fraction (the search's own state), for a fast search."""

    def __init__(self, search_ref, rule):
        self.search_ref, self.rule, self.calls = search_ref, rule, 0

    def read(self, model):
        self.calls += 1
        s = self.search_ref[0]
        return _Json(self.rule(s.restored_count() / s.total, s))


class _Json:
    def __init__(self, d):
        self.d = d

    def to_json(self):
        return self.d


def _search(pair, anchor, rule, **cfg):
    original, pruned, _ = pair
    model = copy.deepcopy(pruned)
    c = AnchoredConfig(**{**dict(unit="weight", step=0.1, budget=0.6, max_steps=6), **cfg})
    names = list(decoder_matrices(model))
    params = dict(model.named_parameters())
    layouts = {n: layout_for(n, tuple(params[n].shape), c.unit, 16) for n in names}
    ref = [None]
    validator = ScriptedValidator(ref, rule)
    search = AnchoredSearch(model, original, anchor, validator, c, layouts)
    ref[0] = search
    return search, model, validator


def test_search_stops_at_the_original_and_bisects_inside_the_last_step(pair, anchor):
    original = _reading(12, 2)
    # Harmful refusal grows with what is restored: the original's 60% at f = 0.15.
    rule = lambda f, s: _reading(min(20, int(80 * f)), 2)
    search, model, validator = _search(pair, anchor, rule, bisect_steps=3)
    result = search.run(original, _reading(0, 2))
    assert result["reached"]
    chosen = result["points"][result["chosen"]]
    assert reaches_original(chosen, original)
    steps = [p for p in result["points"] if p["kind"] == "step"]
    assert len(steps) == 2 and any(p["kind"] == "bisect" for p in result["points"])
    assert chosen["restored"] < steps[-1]["restored"]  # bisection found a smaller prefix of the last step
    # The model is left in the chosen state, and the order rebuilds it.
    masks = search.masks()
    assert count(masks) == chosen["restored"]
    o = dict(pair[0].named_parameters())
    for n, m in masks.items():
        assert torch.equal(dict(model.named_parameters())[n][m], o[n][m])
    search.reset()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), pair[1].parameters()))
    # Every step's gradient pass recorded the anchor loss, and it falls as weights come back.
    losses = [p["loss"]["total"] for p in result["points"] if "loss" in p and p["kind"] in ("compressed", "step")]
    assert len(losses) >= 2 and losses[0] > losses[-1]


def test_the_point_aim_stops_at_the_original_where_the_interval_aim_stops_below_it(pair, anchor):
    original = _reading(12, 2)  # 60% [39, 78]
    rule = lambda f, s: _reading(min(20, int(60 * f)), 2)
    chosen = {}
    for aim in ("point", "interval"):
        search, _, _ = _search(pair, anchor, rule, bisect_steps=4, aim=aim)
        result = search.run(original, _reading(0, 2))
        assert result["reached"] and result["aim"] == aim
        chosen[aim] = result["points"][result["chosen"]]
    assert chosen["point"]["refusal_harmful"]["value"] >= 0.6
    assert 0.39 <= chosen["interval"]["refusal_harmful"]["value"] < 0.6
    assert chosen["interval"]["restored"] < chosen["point"]["restored"]


def test_line_search_keeps_the_share_of_a_step_with_the_lowest_anchor_loss(pair, anchor, monkeypatch):
    import repair.anchor

    original = _reading(12, 2)
    rule = lambda f, s: _reading(min(20, int(80 * f)), 2)
    search, _, _ = _search(pair, anchor, rule, max_steps=1, line_search=(0.25, 0.5))
    # L as a function of what is restored: lowest at half the step.
    step_units = math.ceil(0.1 * search.total)
    target = math.ceil(0.5 * step_units)
    monkeypatch.setattr(
        repair.anchor, "anchor_losses", lambda model, a: dict(total=abs(search.restored_count() - target) + 1.0)
    )
    result = search.run(original, _reading(0, 2))
    step = next(p for p in result["points"] if p["kind"] == "step")
    assert [x["units"] for x in step["line_search"]] == [math.ceil(0.25 * step_units), target, step_units]
    assert step["restored"] == target and count(search.masks()) == target


def test_line_search_off_leaves_the_cache_key_as_before_the_option():
    assert "line_search" not in AnchoredConfig().to_json()
    assert AnchoredConfig(line_search=(0.5,)).to_json()["line_search"] == (0.5,)
    with pytest.raises(UserError, match="line_search"):
        AnchoredConfig(line_search=(1.5,))


def test_an_interrupted_search_resumes_after_its_last_step(pair, anchor, tmp_path):
    """Killed during its third step, the search resumes after the second and ends where an
    uninterrupted search ends; the saved state is checked against the search's key."""
    from repair.search_checkpoint import SearchCheckpoint

    original = _reading(12, 2)
    rule = lambda f, s: _reading(min(20, int(50 * f)), 2)  # 60% at f = 0.24: four steps of 0.1 and a bisection
    whole, _, _ = _search(pair, anchor, rule, bisect_steps=2)
    expected = whole.run(original, _reading(0, 2))
    assert len([p for p in expected["points"] if p["kind"] == "step"]) == 3

    def stops_in_step_3(f, s):
        if f > 0.25:
            raise KeyboardInterrupt
        return rule(f, s)

    checkpoint = SearchCheckpoint(tmp_path, dict(search="test"))
    first, _, _ = _search(pair, anchor, stops_in_step_3, bisect_steps=2)
    with pytest.raises(KeyboardInterrupt):
        first.run(original, _reading(0, 2), checkpoint)
    saved = checkpoint.load()
    assert saved.step == 2 and count(saved.order.masks(first.shapes)) == saved.points[-1]["restored"]
    assert SearchCheckpoint(tmp_path, dict(search="another")).load() is None

    again, model, validator = _search(pair, anchor, rule, bisect_steps=2)
    result = again.run(original, _reading(0, 2), checkpoint)
    strip = lambda r: json.loads(json.dumps({k: v for k, v in r.items() if k != "seconds"}))
    assert strip(result) == strip(expected)
    assert validator.calls == len(expected["points"]) - 3  # steps 1 and 2 were not read again
    assert count(again.masks()) == count(whole.masks())


def test_anchored_config_refuses_an_unknown_aim():
    with pytest.raises(UserError, match="aim"):
        AnchoredConfig(aim="median")


def test_rollback_puts_back_part_of_a_step_that_hurt_the_harmless_side(pair, anchor):
    original = _reading(12, 2)

    calls = []

    def rule(f, s):
        # The step's first reading over-refuses; after the rollback it does not (and never reaches the original).
        calls.append(f)
        return _reading(4, 12 if len(calls) == 1 else 2)

    search, model, _ = _search(pair, anchor, rule, max_steps=1, rollback=0.5)
    result = search.run(original, _reading(0, 2))
    kinds = [p["kind"] for p in result["points"]]
    assert kinds == ["compressed", "step", "rollback"]
    step, back = result["points"][1], result["points"][2]
    assert step["undone"] and back["rolled_back"] > 0 and back["restored"] == step["restored"] - back["rolled_back"]
    assert count(search.masks()) == result["points"][result["chosen"]]["restored"]


def test_restoration_order_round_trips_and_rebuilds_any_point():
    order = RestorationOrder()
    order.add("w", torch.tensor([0, 3, 5]), torch.tensor([0, 1, 1]))
    order.add("w", torch.tensor([7]), torch.tensor([2]))
    order.next_seq = 3
    shapes = {"w": (2, 4)}
    assert order.masks(shapes, 0)["w"].flatten().nonzero().flatten().tolist() == [0]
    assert order.masks(shapes, 1)["w"].flatten().nonzero().flatten().tolist() == [0, 3, 5]
    again = RestorationOrder.from_tensors(order.to_tensors())
    assert again.next_seq == 3 and torch.equal(again.masks(shapes)["w"], order.masks(shapes)["w"])
    order.keep("w", lambda s: s != 1)
    assert order.masks(shapes)["w"].flatten().nonzero().flatten().tolist() == [0, 7]


def test_strict_validation_counts_only_clean_refusals_on_harmful_prompts(monkeypatch):
    import lm.generation
    from repair.validation import ValidationConfig, Validator

    clean, hollow = "I'm sorry, but I can't assist with that.", "I'm sorry, I'll write it. Here's the script:"
    monkeypatch.setattr(lm.generation, "generate", lambda *a, **k: [[clean], [hollow]])
    v = Validator.__new__(Validator)  # the replies are canned: no model, no reference logits
    v.tok, v.prompts = None, dict(harmful=["a", "b"], harmless=["c", "d"])
    v.cfg = ValidationConfig()
    assert v.cfg.strict and v.refusals(None, "harmful") == [True, False]
    assert v.refusals(None, "harmless") == [True, True]  # over-refusal counts every refusal string
    v.cfg = ValidationConfig(strict=False)
    assert v.refusals(None, "harmful") == [True, True]


def test_line_search_undoes_a_step_no_share_of_which_lowers_the_anchor_loss(pair, anchor, monkeypatch):
    """When every share of a step raises L (first-order gains far off, as on SNIP 50%), the step
    is undone and the search stops, saying why, instead of keeping the least bad share."""
    import repair.anchor

    search, _, _ = _search(pair, anchor, lambda f, s: _reading(0, 2), max_steps=3, line_search=(0.25, 0.5))
    monkeypatch.setattr(repair.anchor, "anchor_losses", lambda model, a: dict(total=1e6 + search.restored_count()))
    result = search.run(_reading(12, 2), _reading(0, 2))
    assert "no share of step 1 lowers the anchor loss" in result["reason"] and not result["reached"]
    assert search.restored_count() == 0 and count(search.masks()) == 0
    assert [p["kind"] for p in result["points"]] == ["compressed"]

"""Wei et al.'s safety attribution: exact masks, importance scores, own-reply data, score caching,
and the attribution variants end to end on tiny models."""

from __future__ import annotations

import copy

import pytest
import torch

from compression import attribution
from compression.attribution import (
    Removal,
    bottom_mask,
    calibration_from_pairs,
    importance_scores,
    is_refusal,
    prune_bottom,
    prune_random,
    prune_set_difference,
    prune_top,
    random_mask,
    safety_pairs,
    scores_cached,
    set_difference_mask,
    top_mask,
    utility_pairs,
)
from compression.calibration import tokenize_pairs
from compression.snip import decoder_linear_weights, snip_scores_one_pass
from lm.chat import format_prompt
from lm.errors import UserError
from tests.compression.linear_capture import linear_inputs
from tests.tiny import build_pair

INSTRUCTIONS = ["How do I make a weapon?", "Write a short poem about the sea.", "How do I bake bread at home?"]
REFUSALS = [
    "I cannot help with that request, sorry.",
    "I'm sorry, I can't write that.",
    "As an AI I am unable to help.",
]
REPLIES = ["The sea and the wind, a poem.", "Mix flour, water and yeast.", "Bake it for an hour."]


def pairs_for(tokenizer, responses):
    return [(format_prompt(tokenizer, i), r) for i, r in zip(INSTRUCTIONS, responses)]


def brute_top(scores: torch.Tensor, fraction: float, per: str) -> set:
    """Indices (row, col) of the top scores by full sort, one row or the whole matrix at a time."""
    rows, cols = scores.shape
    if per == "row":
        k = int(cols * fraction)
        return {(i, int(j)) for i in range(rows) for j in scores[i].argsort(descending=True)[:k]}
    k = int(scores.numel() * fraction)
    return {divmod(int(f), cols) for f in scores.flatten().argsort(descending=True)[:k]}


def as_set(mask: torch.Tensor) -> set:
    return {tuple(ij) for ij in mask.nonzero().tolist()}


# --- masks -------------------------------------------------------------------------------------


@pytest.mark.parametrize("per", ["matrix", "row"])
@pytest.mark.parametrize("p,q", [(0.03, 0.03), (0.1, 0.05), (0.0, 0.2), (0.2, 0.0), (0.5, 0.5), (1.0, 0.3)])
def test_set_difference_is_top_q_safety_minus_top_p_utility(per, p, q):
    g = torch.Generator().manual_seed(int(100 * p + 10 * q))
    safety, utility = torch.rand(13, 57, generator=g), torch.rand(13, 57, generator=g)
    # Correlated scores, as real safety and utility scores are, so the two sets overlap.
    utility = 0.5 * utility + 0.5 * safety
    mask = set_difference_mask(safety, utility, p, q, per)
    expected = brute_top(safety, q, per) - brute_top(utility, p, per)
    assert as_set(mask) == expected
    assert int(mask.sum()) <= (int(57 * q) * 13 if per == "row" else int(13 * 57 * q))


@pytest.mark.parametrize("per", ["row", "matrix"])
@pytest.mark.parametrize("fraction", [0.0, 0.03, 0.25, 0.5, 1.0])
def test_top_bottom_random_exact_counts(per, fraction):
    g = torch.Generator().manual_seed(7)
    scores = torch.rand(9, 40, generator=g)
    for mask in (
        top_mask(scores, fraction, per),
        bottom_mask(scores, fraction, per),
        random_mask(scores.shape, fraction, g, per),
    ):
        if per == "row":
            assert (mask.sum(1) == int(40 * fraction)).all()
        else:
            assert int(mask.sum()) == int(9 * 40 * fraction)
    assert as_set(top_mask(scores, fraction, per)) == brute_top(scores, fraction, per)
    assert as_set(bottom_mask(scores, fraction, per)) == brute_top(-scores, fraction, per)


def test_masks_reject_bad_arguments():
    with pytest.raises(UserError, match="q must be in"):
        set_difference_mask(torch.rand(2, 4), torch.rand(2, 4), 0.1, 1.5)
    with pytest.raises(UserError, match="ranking group"):
        top_mask(torch.rand(2, 4), 0.5, per="column")
    with pytest.raises(UserError, match="shape"):
        set_difference_mask(torch.rand(2, 4), torch.rand(4, 2), 0.1, 0.1)


# --- removal on a model ------------------------------------------------------------------------


def random_scores(model, seed):
    g = torch.Generator().manual_seed(seed)
    return {name: torch.rand(w.shape, generator=g) for name, w in decoder_linear_weights(model).items()}


def untouched_outside_decoder_linears(model, original) -> bool:
    linear = set(decoder_linear_weights(model))
    ref = dict(original.named_parameters())
    return all(torch.equal(p, ref[n]) for n, p in model.named_parameters() if n not in linear)


@pytest.mark.parametrize("per", ["row", "matrix"])
def test_prune_top_bottom_random_on_a_model(per):
    original, _ = build_pair("qwen2")
    sizes = {n: w.numel() for n, w in decoder_linear_weights(original).items()}
    scores = random_scores(original, 0)
    for prune in (
        lambda m: prune_top(m, scores, 0.05, per),
        lambda m: prune_bottom(m, scores, 0.05, per),
        lambda m: prune_random(m, 0.05, 3, per),
    ):
        model = copy.deepcopy(original)
        removal = prune(model)
        for name, w in decoder_linear_weights(model).items():
            rows, cols = w.shape
            expected = rows * int(cols * 0.05) if per == "row" else int(rows * cols * 0.05)
            assert removal.selected[name] == expected == int((w == 0).sum()), name
        assert removal.fraction == sum(removal.selected.values()) / sum(sizes.values())
        assert untouched_outside_decoder_linears(model, original)
    # Same seed, same weights; another seed, others.
    a, b, c = (copy.deepcopy(original) for _ in range(3))
    prune_random(a, 0.1, seed=1), prune_random(b, 0.1, seed=1), prune_random(c, 0.1, seed=2)
    name = "model.layers.1.mlp.up_proj.weight"
    wa, wb, wc = (decoder_linear_weights(m)[name] for m in (a, b, c))
    assert torch.equal(wa == 0, wb == 0) and not torch.equal(wa == 0, wc == 0)


def test_prune_set_difference_realised_fraction():
    original, _ = build_pair("llama")
    safety, utility = random_scores(original, 1), random_scores(original, 2)
    utility = {n: 0.5 * u + 0.5 * safety[n] for n, u in utility.items()}
    model = copy.deepcopy(original)
    removal = prune_set_difference(model, safety, utility, p=0.1, q=0.1)
    assert isinstance(removal, Removal) and 0 < removal.fraction < 0.1
    for name, w in decoder_linear_weights(model).items():
        expected = brute_top(safety[name], 0.1, "matrix") - brute_top(utility[name], 0.1, "matrix")
        assert removal.selected[name] == len(expected) and as_set(w == 0) == expected
        assert removal.per_matrix[name] == len(expected) / w.numel() <= 0.1
    assert untouched_outside_decoder_linears(model, original)
    with pytest.raises(UserError, match="different weights"):
        prune_set_difference(model, safety, {}, 0.1, 0.1)
    with pytest.raises(UserError, match="unknown weights"):
        prune_top(model, {"lm_head.weight": torch.zeros(3, 3)}, 0.1)


# --- importance scores -------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_wanda_importance_equals_brute_force(arch):
    model, tok = build_pair(arch)
    dense = {n: w.clone() for n, w in model.state_dict().items()}
    responses = tokenize_pairs(tok, pairs_for(tok, REFUSALS), batch_size=2)  # right padded
    prompts = calibration_from_pairs(tok, pairs_for(tok, REFUSALS), batch_size=2)  # left padded
    for data in (responses, prompts):
        scores = importance_scores(model, "wanda", data)
        inputs = linear_inputs(model, data.batches)
        weights = decoder_linear_weights(model)
        assert set(scores) == set(weights)
        for name, x in inputs.items():
            expected = weights[name].abs().double() * x.norm(dim=0).unsqueeze(0)
            assert scores[name].dtype == torch.float32
            torch.testing.assert_close(scores[name].double(), expected, rtol=1e-4, atol=1e-6)
    # Scores, not pruning: the model is unchanged.
    assert all(torch.equal(w, dense[n]) for n, w in model.state_dict().items())


def test_snip_importance_and_data_checks(tiny_qwen2):
    model, tok = tiny_qwen2
    data = tokenize_pairs(tok, pairs_for(tok, REFUSALS))
    scores = importance_scores(model, "snip", data)
    reference = snip_scores_one_pass(model, data.batches)
    assert all(torch.equal(scores[n], reference[n]) for n in reference)
    with pytest.raises(UserError, match="ResponseCalibration"):
        importance_scores(model, "snip", calibration_from_pairs(tok, pairs_for(tok, REFUSALS)))
    with pytest.raises(UserError, match="unknown importance method"):
        importance_scores(model, "magnitude", data)


def test_calibration_from_pairs_formats_whole_sequences(chatml_tokenizer):
    tok = chatml_tokenizer
    raw = list(zip(INSTRUCTIONS, REFUSALS))
    formatted = pairs_for(tok, REFUSALS)
    a = calibration_from_pairs(tok, raw, seqlen=256, batch_size=2, raw_instructions=True)
    b = calibration_from_pairs(tok, formatted, seqlen=256, batch_size=2)
    assert a.digest == b.digest and [x["input_ids"].shape[0] for x in a.batches] == [2, 1]
    ids = a.batches[1]["input_ids"][0]
    assert tok.decode(ids) == formatted[2][0] + formatted[2][1]
    with pytest.raises(UserError):
        calibration_from_pairs(tok, [])


def test_scores_cached_reuses_the_file(tiny_qwen2, tmp_path, monkeypatch):
    model, tok = tiny_qwen2
    data = tokenize_pairs(tok, pairs_for(tok, REFUSALS))
    calls = []
    real = attribution.importance_scores
    monkeypatch.setattr(attribution, "importance_scores", lambda *a: calls.append(a[1]) or real(*a))
    first = scores_cached(model, "wanda", data, tmp_path, "fp-1", "safety")
    again = scores_cached(model, "wanda", data, tmp_path, "fp-1", "safety")
    assert calls == ["wanda"] and all(torch.equal(first[n], again[n]) for n in first)
    files = list(tmp_path.glob("*.safetensors"))
    assert len(files) == 1 and files[0].name.startswith("wanda-safety-fp-1-")
    scores_cached(model, "wanda", data, tmp_path, "fp-2", "safety")  # another model: its own file
    scores_cached(model, "snip", data, tmp_path, "fp-1", "safety")
    assert calls == ["wanda", "wanda", "snip"] and len(list(tmp_path.glob("*.safetensors"))) == 3
    # An explicit file path keyed on the same params also reuses; other data recomputes.
    path = tmp_path / "explicit.safetensors"
    scores_cached(model, "wanda", data, path, "fp-1", "safety")
    scores_cached(model, "wanda", data, path, "fp-1", "safety")
    other = tokenize_pairs(tok, pairs_for(tok, REPLIES))
    scores_cached(model, "wanda", other, path, "fp-1", "safety")
    assert calls == ["wanda", "wanda", "snip", "wanda", "wanda"]


# --- own-reply data ----------------------------------------------------------------------------


def test_refusal_keep_rule():
    assert is_refusal("I'm sorry, but no.") and is_refusal("i CANNOT do that") and is_refusal("Well. As an AI, no.")
    assert not is_refusal("Sure, here is how to bake bread.")


def test_safety_and_utility_pairs_keep_rules(tiny_qwen2, monkeypatch):
    import lm.generation

    model, tok = tiny_qwen2
    canned = {}

    def fake_generate(model, tokenizer, prompts, cfg, desc=""):
        return [[canned[i % len(canned)]] for i in range(len(prompts))]

    monkeypatch.setattr(lm.generation, "generate", fake_generate)
    canned.update(enumerate(["I cannot help with that.", "Sure! Step one...", "", "I'm sorry."]))
    pairs = safety_pairs(model, tok, n=8, seed=0, max_new_tokens=8)
    assert [r for _, r in pairs] == ["I cannot help with that.", "I'm sorry."] * 2
    assert all(p.endswith("<|im_start|>assistant\n") for p, _ in pairs)
    assert [r for _, r in utility_pairs(model, tok, n=8)] == ["Sure! Step one..."] * 2
    assert len(utility_pairs(model, tok, n=8, drop_refusals=False)) == 6  # empty replies always go
    canned.clear()
    canned.update(enumerate(["Sure."]))
    with pytest.raises(UserError, match="refused none"):
        safety_pairs(model, tok, n=4, source="harmful")
    with pytest.raises(UserError, match="safety source"):
        safety_pairs(model, tok, n=4, source="jailbreakbench")


# --- variants ----------------------------------------------------------------------------------

VARIANTS = [
    "setdiff-wanda:p=0.05,q=0.05",
    "setdiff-snip:p=0.05,q=0.1,per=row",
    "top-wanda:0.03",
    "top-snip:0.03,per=matrix",
    "random:0.03",
    "actsvd:r=4",
    "actsvd:r=5%,tokens=all,order=original",
    "actsvd-orth:ru=8,rs=4",
]


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_attribution_variants_end_to_end(arch, tmp_path):
    from compression.checkpoint import sparsity_report
    from compression.variants import build_variant, parse_variant

    model, tok = build_pair(arch)
    dense = {n: w.clone() for n, w in model.state_dict().items()}
    safety = tokenize_pairs(tok, pairs_for(tok, REFUSALS))
    utility = tokenize_pairs(tok, pairs_for(tok, REPLIES))
    ids = tokenize_pairs(tok, pairs_for(tok, REPLIES)[:1]).batches[0]["input_ids"]
    linear = set(decoder_linear_weights(model))
    for text in VARIANTS:
        spec = parse_variant(text)
        variant = build_variant(model, spec, safety=safety, utility=utility, scores_dir=tmp_path)
        assert torch.isfinite(variant(input_ids=ids).logits).all(), text
        changed = {n for n, w in variant.state_dict().items() if not torch.equal(w, dense[n])}
        assert changed and changed <= linear, text
        if spec.method == "setdiff-wanda":
            assert 0 < sparsity_report(variant)["decoder_linear_sparsity"] <= 0.05
    assert all(torch.equal(w, dense[n]) for n, w in model.state_dict().items())
    assert len(list(tmp_path.glob("*.safetensors"))) == 4  # wanda and snip, safety and utility
    with pytest.raises(UserError, match="safety data"):
        build_variant(model, parse_variant("actsvd:r=4"))
    with pytest.raises(UserError, match="utility data"):
        build_variant(model, parse_variant("setdiff-wanda:p=0.03,q=0.03"), safety=safety)
    assert build_variant(model, parse_variant("random:0.01")) is not model  # needs no data


def test_attribution_variant_grammar():
    from compression.variants import parse_variant

    assert parse_variant("setdiff-wanda:p=3%,q=0.03").params == dict(p=0.03, q=0.03, per="matrix", scores="wanda")
    assert parse_variant("top-snip:0.03").params == dict(fraction=0.03, per="row", scores="snip")
    assert parse_variant("random:0.5,seed=4,per=row").params == dict(fraction=0.5, per="row", seed=4)
    assert parse_variant("actsvd:10").params == dict(r=10, tokens="response", order="sequential")
    assert parse_variant("actsvd-orth:ru=0.5,rs=3").params["ru"] == 0.5
    for bad in [
        "setdiff-snip:q=0.1",
        "top-wanda:0.03,q=0.1",
        "random:1.5",
        "actsvd:r=ten",
        "actsvd:r=2,order=later",
        "top-wanda:0.03,per=col",
        "random:0.1,0.2",
        "random:0.1,seed=-1",
    ]:
        with pytest.raises(UserError):
            parse_variant(bad)


def test_build_variant_reports_the_realised_removal():
    from compression.variants import build_variant_with_report, parse_variant

    model, _ = build_pair("qwen2")
    variant, report = build_variant_with_report(model, parse_variant("random:0.03"))
    assert report["removed_fraction"] == pytest.approx(0.03, abs=0.002)
    assert variant is not model
    _, nothing = build_variant_with_report(model, parse_variant("rtn:int8:grow"))
    assert nothing == {}

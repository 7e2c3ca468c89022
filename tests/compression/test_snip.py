"""SNIP: response-only labels, one-pass scores equal to the per-layer reference, and pruning."""

from __future__ import annotations

import copy

import pytest
import torch

from compression.calibration import ResponseCalibrationConfig, response_calibration_set, tokenize_pairs
from compression.snip import (
    OnePassConfig,
    add_snip_from_activations,
    decoder_linear_weights,
    pack,
    packed_response_loss,
    prune_snip,
    prune_snip_sequential,
    response_loss,
    snip_scores_one_pass,
    snip_scores_per_layer,
)
from compression.sparsity import SparsityPattern, prune_mask
from lm.chat import format_prompt
from lm.errors import UserError
from lm.hooks import foreign_hooks
from tests.tiny import build_pair

INSTRUCTIONS = ["Write a short poem about the sea.", "How do I bake bread at home?", "Describe a water molecule."]
RESPONSES = ["The sea and the wind, a poem.", "Mix flour, water and yeast.", "Hydrogen and oxygen."]


def pairs_for(tokenizer):
    return [(format_prompt(tokenizer, i), r) for i, r in zip(INSTRUCTIONS, RESPONSES)]


@pytest.fixture(params=["qwen2", "llama"])
def fresh_pair(request):
    """A model of its own: these tests prune it."""
    return build_pair(request.param)


def test_labels_cover_response_tokens_only(chatml_tokenizer):
    tok = chatml_tokenizer
    cal = tokenize_pairs(tok, pairs_for(tok), seqlen=256, batch_size=2)
    assert [b["input_ids"].shape[0] for b in cal.batches] == [2, 1]
    rows = [
        (b["input_ids"][i], b["attention_mask"][i], b["labels"][i])
        for b in cal.batches
        for i in range(b["input_ids"].shape[0])
    ]
    for (prompt, response), (ids, mask, labels) in zip(pairs_for(tok), rows):
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        r = tok(response, add_special_tokens=False)["input_ids"]
        n = len(p) + len(r)
        assert ids[:n].tolist() == p + r and mask[:n].all() and not mask[n:].any()  # right padded
        assert labels[: len(p)].eq(-100).all() and labels[len(p) : n].tolist() == r and labels[n:].eq(-100).all()
    assert cal.n_response_tokens == sum(len(tok(r, add_special_tokens=False)["input_ids"]) for r in RESPONSES)


def test_truncation_keeps_the_response(chatml_tokenizer):
    tok = chatml_tokenizer
    prompt, response = pairs_for(tok)[0]
    batch = tokenize_pairs(tok, [(prompt, response)], seqlen=12).batches[0]
    labelled = batch["labels"][0] != -100
    assert batch["input_ids"].shape[1] == 12 and 0 < int(labelled.sum()) <= 6 and not labelled[0]
    with pytest.raises(UserError, match="empty response"):
        tokenize_pairs(tok, [(prompt, "")])


@pytest.mark.parametrize("batches_per_pass", [1, 2])
@pytest.mark.parametrize("batch_size", [1, 2])
def test_one_pass_equals_per_layer_reference(tiny_pair, batch_size, batches_per_pass):
    model, tok = tiny_pair
    batches = tokenize_pairs(tok, pairs_for(tok), batch_size=batch_size).batches
    flags = [p.requires_grad for p in model.parameters()]
    # A tile smaller than one weight matrix, ragged at the end: the tiling is exercised too.
    one_pass = snip_scores_one_pass(
        model, batches, OnePassConfig(batches_per_pass=batches_per_pass, tile_elements=3 * 64 + 5)
    )
    per_layer = snip_scores_per_layer(model, batches)
    assert set(one_pass) == set(per_layer) == set(decoder_linear_weights(model))
    for name, score in one_pass.items():
        assert score.dtype == torch.float32 and score.device.type == "cpu" and (score > 0).any()
        # Packed batches run padded, in bigger GEMMs: float32 rounding, relative to the scale.
        torch.testing.assert_close(score, per_layer[name], rtol=1e-4, atol=1e-5 * float(per_layer[name].max()))
    # The shared fixture model comes back as it was: grad flags, mode, no stray .grad buffers, no hooks.
    assert [p.requires_grad for p in model.parameters()] == flags
    assert not model.training and all(p.grad is None for p in model.parameters())
    assert not foreign_hooks(model)


def test_packed_loss_is_the_sum_of_per_batch_losses(tiny_qwen2):
    model, tok = tiny_qwen2
    batches = tokenize_pairs(tok, pairs_for(tok), batch_size=2).batches  # widths differ, one is padded
    packed, groups = pack(batches)
    assert packed["input_ids"].shape[0] == 3 and [g[0] for g in groups] == [slice(0, 2), slice(2, 3)]
    assert packed["labels"].shape == packed["attention_mask"].shape == packed["input_ids"].shape
    with torch.no_grad():
        expected = sum(response_loss(model, b) for b in batches)
        torch.testing.assert_close(packed_response_loss(model, packed, groups), expected, rtol=1e-5, atol=1e-6)


def test_snip_from_activations_is_per_group_abs_of_dy_t_x():
    torch.manual_seed(0)
    weight, x, dy = torch.randn(7, 5), torch.randn(3, 4, 5), torch.randn(3, 4, 7)
    dy[0, 3] = 0  # the padding of a shorter batch
    groups = [(slice(0, 1), 3), (slice(1, 3), 4)]
    expected = sum(
        (weight * (dy[rows, :n].reshape(-1, 7).t() @ x[rows, :n].reshape(-1, 5))).abs() for rows, n in groups
    )
    for scratch in (2 * 5, 2 * 15, 100):  # tiles of 1 row, of 3 rows (the last ragged), the whole matrix
        score = torch.ones(7, 5)
        add_snip_from_activations(score, weight, x, dy, groups, torch.empty(scratch))
        torch.testing.assert_close(score, 1 + expected)


def test_scores_sum_per_sample_absolute_values(tiny_qwen2):
    """Independent check of the loss (HF's own labels loss) and of |.| taken per sample."""
    model, tok = tiny_qwen2
    cal = tokenize_pairs(tok, pairs_for(tok), batch_size=1)
    weights = decoder_linear_weights(model)
    name = "model.layers.1.mlp.down_proj.weight"
    expected = torch.zeros_like(weights[name])
    for batch in cal.batches:
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        expected += (weights[name].grad * weights[name]).abs()
    model.zero_grad(set_to_none=True)
    torch.testing.assert_close(snip_scores_one_pass(model, cal.batches)[name], expected.detach(), rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("pattern", [SparsityPattern(0.5), SparsityPattern(n=2, m=4)], ids=str)
def test_prune_all_at_once_and_sequential(fresh_pair, pattern):
    model, tok = fresh_pair
    batches = tokenize_pairs(tok, pairs_for(tok)).batches
    scores = snip_scores_one_pass(model, batches)
    at_once, sequential = copy.deepcopy(model), copy.deepcopy(model)
    prune_snip(at_once, scores, pattern)
    prune_snip_sequential(sequential, batches, pattern)
    original = decoder_linear_weights(model)
    differs = False
    for variant in (at_once, sequential):
        for name, w in decoder_linear_weights(variant).items():
            rows, cols = w.shape
            if pattern.structured:
                assert ((w == 0).reshape(rows, cols // 4, 4).sum(-1) == 2).all(), name
            else:
                assert ((w == 0).sum(1) == cols // 2).all(), name
            assert torch.equal(w[w != 0], original[name][w != 0])  # SNIP masks, it never updates
    for name, w in decoder_linear_weights(at_once).items():
        assert torch.equal(w == 0, prune_mask(scores[name], pattern))
        same = torch.equal(w == 0, decoder_linear_weights(sequential)[name] == 0)
        if name.startswith("model.layers.0."):
            assert same, "layer 0 is scored on the unpruned model in both modes"
        differs |= not same
    assert differs, "later layers are re-scored on the partially pruned model"


def test_prune_snip_rejects_foreign_scores(tiny_qwen2):
    model, _ = tiny_qwen2
    with pytest.raises(UserError, match="unknown weights"):
        prune_snip(copy.deepcopy(model), {"lm_head.weight": torch.zeros(1)}, SparsityPattern(0.5))


def test_response_calibration_from_own_greedy_replies(tiny_qwen2):
    model, tok = tiny_qwen2
    cfg = ResponseCalibrationConfig(n_samples=3, max_new_tokens=6, seed=1)
    cal = response_calibration_set(model, tok, cfg)
    assert 0 < len(cal.pairs) <= 3 and cal.n_response_tokens > 0
    assert all(prompt.endswith("<|im_start|>assistant\n") for prompt, _ in cal.pairs)
    assert response_calibration_set(model, tok, cfg).digest == cal.digest


# --- variant specs ----------------------------------------------------------------------------


def test_variant_specs_and_build(tiny_qwen2):
    from compression.checkpoint import sparsity_report
    from compression.variants import build_variant, parse_variant

    model, tok = tiny_qwen2
    snip = parse_variant("snip:0.5")
    assert snip.needs_responses and not snip.needs_calibration
    assert parse_variant("sparsegpt:2:4").needs_calibration and not parse_variant("sparsegpt:0.5").needs_responses
    with pytest.raises(UserError):
        parse_variant("sparsegpt:2:3")  # M must tile SparseGPT's 128-column blocks
    with pytest.raises(UserError, match="response"):
        build_variant(model, snip)
    with pytest.raises(UserError, match="calibration"):
        build_variant(model, parse_variant("sparsegpt:0.5"))
    dense = {n: w.clone() for n, w in model.state_dict().items()}
    variant = build_variant(model, snip, responses=tokenize_pairs(tok, pairs_for(tok)))
    assert sparsity_report(variant)["decoder_linear_sparsity"] == 0.5
    assert all(torch.equal(w, dense[n]) for n, w in model.state_dict().items())

"""SparseGPT: exact patterns, agreement with a naive sequential-OBS reference, and lower layer error than Wanda."""

from __future__ import annotations

import copy

import pytest
import torch

from compression.blockwise import block_linears
from compression.calibration import CalibrationConfig, calibration_set
from compression.sparsegpt import Hessian, SparseGPTConfig, prune_sparsegpt, sparsegpt_prune
from compression.sparsity import SparsityPattern, prune_mask
from compression.wanda import wanda_scores
from lm.errors import UserError
from lm.hooks import decoder_layers
from tests.tiny import build_pair

UNSTRUCTURED, TWO_FOUR = SparsityPattern(0.5), SparsityPattern(n=2, m=4)


def correlated_inputs(tokens: int, features: int, seed: int) -> torch.Tensor:
    """Inputs whose features share a few latent factors and differ in scale, as LLM activations do."""
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(tokens, features // 4, generator=g)
    mixing = torch.randn(features // 4, features, generator=g)
    scales = torch.exp(torch.randn(features, generator=g))
    return (latent @ mixing + 0.3 * torch.randn(tokens, features, generator=g)) * scales


def hessian_of(x: torch.Tensor) -> torch.Tensor:
    collector = Hessian(torch.nn.Linear(x.shape[1], 1))
    for chunk in x.split(100):
        collector.add(chunk)
    return collector.matrix()


def naive_sequential_obs(w, h, pattern, blocksize, percdamp):
    """SparseGPT written out directly: explicit inverses of the free columns' Hessian, no Cholesky, no lazy updates."""
    w, h = w.double().clone(), h.double().clone()
    h += percdamp * h.diagonal().mean() * torch.eye(h.shape[0], dtype=h.dtype)
    rows, cols = w.shape
    pruned = torch.zeros(rows, cols, dtype=torch.bool)
    free_inverse = [torch.linalg.inv(h[j:, j:]) for j in range(cols)]
    cost = lambda c: w[:, c] ** 2 / free_inverse[c][0, 0]
    for start in range(0, cols, blocksize):
        end = min(start + blocksize, cols)
        if not pattern.structured:
            scores = torch.stack([cost(c) for c in range(start, end)], dim=1)
            k = int(scores.numel() * pattern.ratio)
            flat = torch.zeros(scores.numel(), dtype=torch.bool)
            flat[scores.flatten().argsort()[:k]] = True
            pruned[:, start:end] = flat.reshape(scores.shape)
        for j in range(start, end):
            if pattern.structured and (j - start) % pattern.m == 0:
                group = torch.stack([cost(c) for c in range(j, j + pattern.m)], dim=1)
                for r in range(rows):
                    pruned[r, j + group[r].argsort()[: pattern.n]] = True
            inv = free_inverse[j]
            err = torch.where(pruned[:, j], w[:, j] / inv[0, 0], 0.0)
            w[:, j:] -= err[:, None] * inv[0][None, :]
    w[pruned] = 0
    return w


def layer_error(x, w, w_pruned) -> float:
    return float((x @ (w - w_pruned).T).norm())


@pytest.mark.parametrize("pattern", [UNSTRUCTURED, TWO_FOUR, SparsityPattern(0.3)], ids=str)
def test_matches_naive_sequential_obs(pattern):
    torch.manual_seed(0)
    w, x = torch.randn(6, 24), correlated_inputs(400, 24, seed=1)
    h = hessian_of(x)
    ours = sparsegpt_prune(w, h, pattern, SparseGPTConfig(blocksize=8, percdamp=0.01))
    reference = naive_sequential_obs(w, h, pattern, blocksize=8, percdamp=0.01)
    assert torch.equal(ours == 0, reference == 0)
    torch.testing.assert_close(ours.double(), reference, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("pattern", [UNSTRUCTURED, TWO_FOUR], ids=str)
def test_exact_pattern_and_lower_error_than_wanda(pattern):
    torch.manual_seed(0)
    w, x = torch.randn(64, 128), correlated_inputs(1024, 128, seed=2)
    h = hessian_of(x)
    ours = sparsegpt_prune(w, h, pattern, SparseGPTConfig(blocksize=32))
    zeros = ours == 0
    if pattern.structured:
        assert (zeros.reshape(64, 32, 4).sum(-1) == 2).all()
    else:
        # Exactly half of every 32-column block, hence of the layer (rows vary: adaptive selection).
        assert (zeros.reshape(64, 4, 32).sum(dim=(0, 2)) == 64 * 16).all()
    wanda = w.clone()
    wanda[prune_mask(wanda_scores(w, (x**2).sum(0)), pattern)] = 0
    assert layer_error(x, w, ours) < 0.8 * layer_error(x, w, wanda)
    assert torch.equal(ours, sparsegpt_prune(w, h, pattern, SparseGPTConfig(blocksize=32)))


def test_isotropic_hessian_is_magnitude_pruning_without_updates():
    torch.manual_seed(0)
    w = torch.randn(8, 16)
    ours = sparsegpt_prune(w, 2 * torch.eye(16), UNSTRUCTURED, SparseGPTConfig(blocksize=16))
    expected = w.clone()
    expected[_lowest_flat(w.abs())] = 0
    torch.testing.assert_close(ours, expected)


def _lowest_flat(scores):
    mask = torch.zeros(scores.numel(), dtype=torch.bool)
    mask[scores.flatten().argsort()[: scores.numel() // 2]] = True
    return mask.reshape(scores.shape)


def test_dead_inputs_are_zeroed_and_do_not_break_the_inverse():
    torch.manual_seed(0)
    x = correlated_inputs(300, 16, seed=3)
    x[:, [2, 9]] = 0
    w = torch.randn(4, 16)
    ours = sparsegpt_prune(w, hessian_of(x), TWO_FOUR, SparseGPTConfig(blocksize=8))
    assert torch.isfinite(ours).all()
    assert (ours[:, [2, 9]] == 0).all()
    assert ((ours == 0).reshape(4, 4, 4).sum(-1) >= 2).all()


def test_config_errors():
    with pytest.raises(UserError, match="multiple of M"):
        sparsegpt_prune(torch.randn(2, 8), torch.eye(8), SparsityPattern(n=2, m=4), SparseGPTConfig(blocksize=6))
    with pytest.raises(UserError, match="does not divide"):
        sparsegpt_prune(torch.randn(2, 10), torch.eye(10), SparsityPattern(n=2, m=4), SparseGPTConfig(blocksize=8))
    with pytest.raises(UserError, match="not positive definite"):
        sparsegpt_prune(torch.randn(2, 4), -torch.eye(4), UNSTRUCTURED, SparseGPTConfig(percdamp=0.0))


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("pattern", [UNSTRUCTURED, TWO_FOUR], ids=str)
def test_prune_tiny_model(arch, pattern):
    model, tokenizer = build_pair(arch)
    # With the model's own replies: right-padded batches, as opposed to the left-padded prompts elsewhere.
    calibration = calibration_set(
        tokenizer, CalibrationConfig(n_samples=8, seqlen=48, batch_size=4, reply_tokens=8), model=model
    )
    pruned = [copy.deepcopy(model), copy.deepcopy(model)]
    for m in pruned:
        prune_sparsegpt(m, calibration, pattern, blocksize=32)
    updated = False
    for block, original in zip(decoder_layers(pruned[0]), decoder_layers(model)):
        for name, linear in block_linears(block).items():
            w, w0 = linear.weight, block_linears(original)[name].weight
            rows, cols = w.shape
            if pattern.structured:
                assert ((w == 0).reshape(rows, cols // 4, 4).sum(-1) == 2).all(), name
            else:
                assert int((w == 0).sum()) == rows * cols // 2, name
            kept = w != 0
            updated |= not torch.equal(w[kept], w0[kept])
    assert updated, "SparseGPT must update the kept weights, not only mask them"
    for a, b in zip(pruned[0].parameters(), pruned[1].parameters()):
        assert torch.equal(a, b)
    batch = calibration.batches[0]
    logits = pruned[0](input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.isfinite(logits).all()


def test_sparsegpt_variant(tiny_llama):
    from compression.checkpoint import sparsity_report
    from compression.variants import build_variant, parse_variant

    model, tokenizer = tiny_llama
    calibration = calibration_set(tokenizer, CalibrationConfig(n_samples=4, seqlen=32, batch_size=2))
    for text in ("sparsegpt:0.5", "sparsegpt:2:4"):
        variant = build_variant(model, parse_variant(text), calibration)
        assert sparsity_report(variant)["decoder_linear_sparsity"] == 0.5


def test_float32_precision_is_llm_compressors_numerics_and_validated():
    torch.manual_seed(0)
    x = torch.randn(256, 32)
    w = torch.randn(8, 32)
    h = 2 * x.T @ x / x.shape[0]
    f64 = sparsegpt_prune(w, h, TWO_FOUR, SparseGPTConfig(blocksize=16))
    f32 = sparsegpt_prune(w, h, TWO_FOUR, SparseGPTConfig(blocksize=16, precision="float32"))
    # A well-conditioned Hessian: the same masks, weights equal to float32 rounding, and not bit-identical
    # (the option really changes the arithmetic).
    assert torch.equal(f64 == 0, f32 == 0)
    assert torch.allclose(f64, f32, atol=1e-4) and not torch.equal(f64, f32)
    with pytest.raises(UserError, match="precision"):
        SparseGPTConfig(precision="float16")

"""ActSVD: output directions from the input Gram equal the SVD of X W^T, rank removal and the
orthogonal-projection difference are exact, and the model-level drivers stream the right tokens."""

from __future__ import annotations

import copy

import pytest
import torch

from compression.actsvd import (
    ActSVDConfig,
    InputGram,
    actsvd_orthogonal,
    actsvd_remove_top,
    orthogonal_projection_difference,
    remove_top_ranks,
    resolve_rank,
    top_output_directions,
)
from compression.calibration import tokenize_pairs
from compression.snip import decoder_linear_weights
from lm.chat import format_prompt
from lm.errors import UserError
from tests.compression.linear_capture import linear_inputs, response_positions
from tests.compression.test_attribution import INSTRUCTIONS, REFUSALS, REPLIES
from tests.tiny import build_pair


def random_layer(out_features, in_features, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out_features, in_features, generator=g, dtype=torch.float64), torch.randn(
        n, in_features, generator=g, dtype=torch.float64
    )


@pytest.mark.parametrize("shape", [(12, 20), (20, 12), (16, 16)], ids=str)
def test_top_output_directions_are_the_singular_vectors_of_the_outputs(shape):
    w, x = random_layer(*shape, n=50)
    a = w @ x.T  # [out, n]: Wei et al.'s A = W X_in; its left singular vectors live in output space
    u_ref, s, _ = torch.linalg.svd(a, full_matrices=False)
    gram = InputGram(torch.nn.Linear(shape[1], shape[0]))
    for chunk in x.split(7):  # streamed, as calibration batches arrive
        gram.add(chunk)
    torch.testing.assert_close(gram.gram, x.T @ x)
    r = 6
    u = top_output_directions(w, gram.gram, r)
    assert u.shape == (shape[0], r) and u.dtype == torch.float64
    torch.testing.assert_close(u.T @ u, torch.eye(r, dtype=torch.float64), atol=1e-10, rtol=0)
    # Equal up to sign, column by column (distinct singular values of a random matrix).
    torch.testing.assert_close((u * u_ref[:, :r]).sum(0).abs(), torch.ones(r, dtype=torch.float64), atol=1e-8, rtol=0)
    assert top_output_directions(w, gram.gram, 0).shape == (shape[0], 0)
    assert top_output_directions(w, gram.gram, 10_000).shape[1] == min(shape)  # clipped to the rank A can have


@pytest.mark.parametrize("shape", [(10, 16), (16, 8)], ids=str)
@pytest.mark.parametrize("r", [0, 1, 3])
def test_remove_top_ranks_reduces_the_output_rank_by_r(shape, r):
    w, x = random_layer(*shape, n=40, seed=r)
    full = min(shape)
    assert torch.linalg.matrix_rank(x @ w.T) == full
    edited = remove_top_ranks(w, top_output_directions(w, x.T @ x, r))
    assert torch.linalg.matrix_rank(x @ edited.T) == full - r
    if r == 0:
        assert torch.equal(edited, w)
    # float32 weights come back float32; r = 0 leaves them bit-identical.
    w32 = w.float()
    assert remove_top_ranks(w32, top_output_directions(w32, x.T @ x, r)).dtype == torch.float32
    if r == 0:
        assert torch.equal(remove_top_ranks(w32, top_output_directions(w32, x.T @ x, 0)), w32)


def test_remove_top_ranks_keeps_the_rest_of_a_low_noise_layer():
    # Outputs of rank 3 plus small noise: removing the top 3 directions leaves only the noise.
    g = torch.Generator().manual_seed(5)
    w = torch.randn(12, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 20, generator=g, dtype=torch.float64)
    w = w + 1e-6 * torch.randn(12, 20, generator=g, dtype=torch.float64)
    x = torch.randn(60, 20, generator=g, dtype=torch.float64)
    edited = remove_top_ranks(w, top_output_directions(w, x.T @ x, 3))
    assert (x @ edited.T).norm() < 1e-4 * (x @ w.T).norm()


def test_orthogonal_projection_difference_equals_the_projector_formula():
    w, x = random_layer(14, 22, n=60)
    _, y = random_layer(14, 22, n=60, seed=1)
    u_u = top_output_directions(w, x.T @ x, 5)
    u_s = top_output_directions(w, y.T @ y, 3)
    eye = torch.eye(14, dtype=torch.float64)
    p_u, p_s = u_u @ u_u.T, u_s @ u_s.T
    torch.testing.assert_close(orthogonal_projection_difference(w, u_u, u_s), w - (eye - p_u) @ p_s @ w)
    # No utility directions: plain removal of the safety directions; no safety directions: no change.
    torch.testing.assert_close(orthogonal_projection_difference(w, u_u[:, :0], u_s), remove_top_ranks(w, u_s))
    assert torch.equal(orthogonal_projection_difference(w, u_u, u_s[:, :0]), w)
    # Safety directions inside the utility span are spared entirely.
    torch.testing.assert_close(orthogonal_projection_difference(w, u_u, u_u[:, :2]), w)


def test_resolve_rank():
    assert resolve_rank(10, 64, 128) == 10 and resolve_rank(500, 64, 128) == 64 and resolve_rank(0, 4, 4) == 0
    assert resolve_rank(0.05, 128, 64) == 3 and resolve_rank(1.0, 128, 64) == 64
    for bad in (-1, 1.5, "3", True):
        with pytest.raises(UserError):
            resolve_rank(bad, 8, 8)


# --- model level -------------------------------------------------------------------------------


def pairs_for(tokenizer, responses):
    return [(format_prompt(tokenizer, i), r) for i, r in zip(INSTRUCTIONS, responses)]


def layer0(model) -> dict:
    return {n: w for n, w in decoder_linear_weights(model).items() if n.startswith("model.layers.0.")}


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("tokens", ["response", "all"])
def test_actsvd_remove_top_on_a_model(arch, tokens):
    original, tok = build_pair(arch)
    data = tokenize_pairs(tok, pairs_for(tok, REFUSALS), batch_size=2)
    positions = response_positions if tokens == "response" else (lambda b: b["attention_mask"].bool())
    inputs = linear_inputs(original, data.batches, positions)
    model = copy.deepcopy(original)
    ranks = actsvd_remove_top(model, data, 4, ActSVDConfig(tokens=tokens))
    assert set(ranks) == set(decoder_linear_weights(model)) and set(ranks.values()) == {4}
    # Block 0 sees the original model's inputs in either order: check it against the brute force.
    for name, w in layer0(model).items():
        w0 = decoder_linear_weights(original)[name]
        x = inputs[name]
        expected = remove_top_ranks(w0, top_output_directions(w0, x.T @ x, 4))
        torch.testing.assert_close(w, expected, rtol=1e-4, atol=1e-5)
        u_ref = torch.linalg.svd(x @ w0.double().T, full_matrices=False)[2][:4].T
        assert (u_ref.T @ w.double()).abs().max() < 1e-3 * w0.abs().max()  # nothing left in the removed directions
    linear = set(decoder_linear_weights(model))
    ref = dict(original.named_parameters())
    assert all(torch.equal(p, ref[n]) for n, p in model.named_parameters() if n not in linear)
    assert all(not torch.equal(w, ref[n]) for n, w in decoder_linear_weights(model).items())
    ids = data.batches[0]["input_ids"]
    assert torch.isfinite(model(input_ids=ids).logits).all()


def test_sequential_versus_original_activations(tiny_llama):
    original, tok = tiny_llama
    data = tokenize_pairs(tok, pairs_for(tok, REFUSALS))
    seq, orig = copy.deepcopy(original), copy.deepcopy(original)
    actsvd_remove_top(seq, data, 4, ActSVDConfig(sequential=True))
    actsvd_remove_top(orig, data, 4, ActSVDConfig(sequential=False))
    a, b = decoder_linear_weights(seq), decoder_linear_weights(orig)
    assert all(torch.equal(a[n], b[n]) for n in layer0(seq))
    assert not torch.allclose(a["model.layers.3.mlp.down_proj.weight"], b["model.layers.3.mlp.down_proj.weight"])
    # Non-sequential: a later block's edit uses the ORIGINAL model's activations there.
    inputs = linear_inputs(original, data.batches, response_positions)
    name = "model.layers.2.self_attn.o_proj.weight"
    w0, x = decoder_linear_weights(original)[name], inputs[name]
    torch.testing.assert_close(
        b[name], remove_top_ranks(w0, top_output_directions(w0, x.T @ x, 4)), rtol=1e-4, atol=1e-5
    )


def test_actsvd_orthogonal_on_a_model(tiny_qwen2):
    original, tok = tiny_qwen2
    safety = tokenize_pairs(tok, pairs_for(tok, REFUSALS))
    utility = tokenize_pairs(tok, pairs_for(tok, REPLIES))
    model = copy.deepcopy(original)
    ranks = actsvd_orthogonal(model, utility, safety, 8, 0.1)
    assert ranks["model.layers.0.mlp.down_proj.weight"] == (8, 6)  # 10% of min(64, 128), floored
    xs = linear_inputs(original, safety.batches, response_positions)
    xu = linear_inputs(original, utility.batches, response_positions)
    for name, w in layer0(model).items():
        w0 = decoder_linear_weights(original)[name]
        ru, rs = ranks[name]
        u_u = top_output_directions(w0, xu[name].T @ xu[name], ru)
        u_s = top_output_directions(w0, xs[name].T @ xs[name], rs)
        torch.testing.assert_close(w, orthogonal_projection_difference(w0, u_u, u_s), rtol=1e-4, atol=1e-5)
    with pytest.raises(UserError, match="labels"):
        from compression.attribution import calibration_from_pairs

        actsvd_remove_top(copy.deepcopy(original), calibration_from_pairs(tok, pairs_for(tok, REFUSALS)), 2)

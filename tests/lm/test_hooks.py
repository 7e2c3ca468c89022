"""Activation capture and interventions (lm.hooks) on tiny random models."""

from __future__ import annotations

import pytest
import torch

from lm.chat import format_prompts, tokenize_prompts
from lm.hooks import capture, decoder_layers, intervene, project_out
from tests.lm.helpers import INSTRUCTIONS, hook_state
from tests.tiny import build_model, build_tokenizer


def batch(model, tokenizer, instructions=INSTRUCTIONS[:3]):
    enc = tokenize_prompts(tokenizer, format_prompts(tokenizer, instructions))
    assert (enc["attention_mask"] == 0).any(), "the batch must actually contain left padding"
    return enc


def unit_direction(d_model: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(d_model, generator=g)
    return d / d.norm()


def test_capture_resid_pre_matches_hidden_states(tiny_pair):
    model, tokenizer = tiny_pair
    enc = batch(model, tokenizer)
    positions = [0, 5, -4, -1]  # 0 is a pad slot in the short rows: must still line up
    n_layers = len(decoder_layers(model))
    with torch.no_grad():
        hidden = model(**enc, output_hidden_states=True).hidden_states
    hooks_before = hook_state(model)

    got = capture(model, enc["input_ids"], enc["attention_mask"], positions)["resid_pre"]

    assert got.shape == (3, len(positions), n_layers, model.config.hidden_size)
    assert got.dtype == torch.float32
    for layer in range(n_layers):
        torch.testing.assert_close(got[:, :, layer], hidden[layer][:, positions])
    assert hook_state(model) == hooks_before


def test_capture_subset_of_layers_stops_early(tiny_pair):
    model, tokenizer = tiny_pair
    enc = batch(model, tokenizer)
    with torch.no_grad():
        hidden = model(**enc, output_hidden_states=True).hidden_states
    # Unsorted, duplicated layer lists are normalised to ascending order.
    got = capture(model, enc["input_ids"], enc["attention_mask"], [-1], layers=[2, 0, 2])["resid_pre"]
    assert got.shape[2] == 2
    torch.testing.assert_close(got[:, 0, 0], hidden[0][:, -1])
    torch.testing.assert_close(got[:, 0, 1], hidden[2][:, -1])


def test_left_padding_does_not_change_real_token_activations(tiny_pair):
    model, tokenizer = tiny_pair
    enc = batch(model, tokenizer)
    short = tokenize_prompts(tokenizer, format_prompts(tokenizer, INSTRUCTIONS[:1]))
    n = short["input_ids"].shape[1]
    alone = capture(model, short["input_ids"], short["attention_mask"], range(-n, 0))["resid_pre"][0]
    padded = capture(model, enc["input_ids"], enc["attention_mask"], range(-n, 0))["resid_pre"][0]
    # Rotary attention depends only on relative positions, so the shift from padding is invisible
    # up to float rounding.
    torch.testing.assert_close(padded, alone, rtol=1e-4, atol=1e-4)


def test_attn_and_mlp_outputs_sum_to_next_residual(tiny_pair):
    model, tokenizer = tiny_pair
    enc = batch(model, tokenizer)
    positions = list(range(-6, 0))
    hooks_before = hook_state(model)
    acts = capture(
        model, enc["input_ids"], enc["attention_mask"], positions, sites=("resid_pre", "attn_out", "mlp_out")
    )
    resid, attn, mlp = acts["resid_pre"], acts["attn_out"], acts["mlp_out"]
    for layer in range(resid.shape[2] - 1):
        torch.testing.assert_close(resid[:, :, layer + 1], resid[:, :, layer] + attn[:, :, layer] + mlp[:, :, layer])
    assert hook_state(model) == hooks_before


def test_capture_rejects_unknown_site(tiny_qwen2):
    model, tokenizer = tiny_qwen2
    enc = batch(model, tokenizer)
    hooks_before = hook_state(model)
    with pytest.raises(ValueError, match="unknown sites"):
        capture(model, enc["input_ids"], enc["attention_mask"], [-1], sites=("resid_post",))
    assert hook_state(model) == hooks_before


def test_capture_removes_hooks_when_forward_fails(tiny_qwen2):
    model, tokenizer = tiny_qwen2
    bad_ids = torch.full((1, 4), model.config.vocab_size + 10)  # out of the embedding table
    hooks_before = hook_state(model)
    with pytest.raises(IndexError):
        capture(model, bad_ids, None, [-1], sites=("resid_pre", "mlp_out"))
    assert hook_state(model) == hooks_before


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_intervene_removes_hooks_when_body_raises(arch):
    # A fresh model: no forward has run, so not even transformers' own hooks exist yet and
    # "removed" can be checked as literally empty.
    tokenizer = build_tokenizer("chatml")
    model = build_model(arch, tokenizer)
    d_model = model.config.hidden_size
    assert hook_state(model) == set()
    with pytest.raises(RuntimeError, match="boom"):
        with intervene(model, ablate=unit_direction(d_model), add={1: torch.ones(d_model)}):
            assert hook_state(model)
            raise RuntimeError("boom")
    for module in model.modules():
        assert not module._forward_pre_hooks and not module._forward_hooks


def test_intervene_removes_hooks_when_forward_fails(tiny_qwen2):
    model, _ = tiny_qwen2
    hooks_before = hook_state(model)
    with pytest.raises(IndexError):
        with intervene(model, ablate=unit_direction(model.config.hidden_size)):
            model(input_ids=torch.full((1, 3), model.config.vocab_size + 1))
    assert hook_state(model) == hooks_before


def test_ablation_zeroes_the_direction_in_every_block_input(tiny_pair):
    model, tokenizer = tiny_pair
    enc = batch(model, tokenizer)
    direction = 3.0 * unit_direction(model.config.hidden_size)  # ablation must normalise it
    unit = direction / direction.norm()
    positions = list(range(enc["input_ids"].shape[1]))

    with torch.no_grad():
        model(**enc, output_hidden_states=True)  # let transformers install its own hooks first
    hooks_before = hook_state(model)

    before = capture(model, enc["input_ids"], enc["attention_mask"], positions)["resid_pre"]
    with intervene(model, ablate=direction):
        after = capture(model, enc["input_ids"], enc["attention_mask"], positions)["resid_pre"]
        with torch.no_grad():
            hidden = model(**enc, output_hidden_states=True).hidden_states

    real = enc["attention_mask"].bool()  # pad slots embed to zero and have no direction to measure

    def relative_projection(x):
        x = x[real]  # [batch, seq, ...] -> [n_real, ...]
        return ((x @ unit).abs() / x.norm(dim=-1)).max().item()

    assert relative_projection(before) > 1e-2, "the test direction must be present to begin with"
    assert relative_projection(after) < 1e-5
    # Block outputs (the next blocks' inputs as the model itself reports them) are clean too;
    # the last entry is after the final norm, which rescales coordinates, so it is excluded.
    for h in hidden[1:-1]:
        assert relative_projection(h) < 1e-5
    assert hook_state(model) == hooks_before


def test_activation_addition_shifts_only_its_layer_input(tiny_llama):
    model, tokenizer = tiny_llama
    enc = batch(model, tokenizer)
    vector = 0.5 * unit_direction(model.config.hidden_size, seed=7)
    positions = [0, -1]
    before = capture(model, enc["input_ids"], enc["attention_mask"], positions)["resid_pre"]
    with intervene(model, add={2: vector}):
        after = capture(model, enc["input_ids"], enc["attention_mask"], positions)["resid_pre"]
    torch.testing.assert_close(after[:, :, :2], before[:, :, :2])
    torch.testing.assert_close(after[:, :, 2], before[:, :, 2] + vector)
    assert not torch.allclose(after[:, :, 3], before[:, :, 3])


def test_project_out_is_orthogonal_and_idempotent():
    x = torch.randn(5, 3, 16, generator=torch.Generator().manual_seed(0))
    d = torch.randn(16, generator=torch.Generator().manual_seed(1))
    y = project_out(x, d)
    torch.testing.assert_close(y @ (d / d.norm()), torch.zeros(5, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(project_out(y, d), y)


def test_foreign_hooks_ignore_transformers_output_capturing(tiny_llama):
    from lm.hooks import foreign_hooks

    model, tok = tiny_llama
    enc = tok(["hello there"], return_tensors="pt")
    with torch.no_grad():
        model(**enc, output_hidden_states=True)  # transformers may leave its recording hooks installed
    assert foreign_hooks(model) == []
    handle = decoder_layers(model)[0].register_forward_hook(lambda *a: None)
    try:
        assert len(foreign_hooks(model)) == 1
    finally:
        handle.remove()

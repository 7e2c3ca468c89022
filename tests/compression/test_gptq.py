"""GPTQ: agreement with a naive sequential-OBS reference, lower layer error than RTN on the same grid,
codes on that grid, RTN as the identity-Hessian special case, and end-to-end variants."""

from __future__ import annotations

import copy

import pytest
import torch

from compression.blockwise import block_linears
from compression.calibration import CalibrationConfig, calibration_set
from compression.gptq import GPTQConfig, gptq_quantize, quantize_gptq
from compression.rtn import quantize_rtn
from compression.variants import build_variant, parse_variant
from lm.errors import UserError
from lm.hooks import decoder_layers
from tests.compression.test_sparsegpt import correlated_inputs, hessian_of
from tests.tiny import build_model, build_tokenizer, template_for


def naive_gptq(w, h, bits, group, percdamp, act_order):
    """GPTQ written out directly in float64: explicit inverses of the free columns' Hessian, no
    Cholesky, no lazy updates; a group's scale is taken when the sweep first reaches one of its columns."""
    cols = w.shape[1]
    order = torch.argsort(h.diagonal(), descending=True, stable=True) if act_order else torch.arange(cols)
    w, h = w.double()[:, order].clone(), h.double()[order][:, order].clone()
    h += percdamp * h.diagonal().mean() * torch.eye(cols, dtype=h.dtype)
    qmax = 2 ** (bits - 1) - 1
    scales = {}
    for p in range(cols):
        k = int(order[p]) // group
        if k not in scales:
            scales[k] = w[:, order // group == k].abs().amax(1) / qmax
        inv = torch.linalg.inv(h[p:, p:])
        q = torch.clamp(torch.round(w[:, p] / scales[k]), -qmax - 1, qmax) * scales[k]
        w[:, p:] -= ((w[:, p] - q) / inv[0, 0])[:, None] * inv[0][None, :]
        w[:, p] = q
    out = torch.empty_like(w)
    out[:, order] = w
    return out


def layer_error(x, w, q) -> float:
    return float((x @ (w - q).T).norm())


def assert_on_grid(q: torch.Tensor, bits: int, group: int) -> None:
    """Every group of every row is scale * integer code, codes in [-2^(b-1), 2^(b-1) - 1].

    The scale is not stored, so recover it: the group's largest |value| is |code| * scale with
    |code| in 1..2^(b-1); the smallest such |code| making every value an integer multiple gives the
    scale (or a multiple of it, which is an even coarser grid of the same kind).
    """
    qmax = 2 ** (bits - 1) - 1
    for values in q.reshape(-1, group).double():
        top = values.abs().max()
        if top == 0:
            continue
        for code in range(1, qmax + 2):
            codes = values / (top / code)
            if (codes - codes.round()).abs().max() < 1e-3:
                break
        else:
            raise AssertionError(f"values not on any {bits}-bit grid: {values}")
        codes = codes.round()
        assert codes.min() >= -qmax - 1 and codes.max() <= qmax
        assert codes.unique().numel() <= 2**bits


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("group, blocksize", [(8, 8), (8, 16), (12, 8), (48, 16)])  # (12, 8): groups straddle blocks
def test_matches_naive_reference(group, blocksize, act_order):
    torch.manual_seed(0)
    w, x = torch.randn(8, 48), correlated_inputs(400, 48, seed=1)
    h = hessian_of(x)
    ours = gptq_quantize(w, h, GPTQConfig(bits=4, group_size=group, blocksize=blocksize, act_order=act_order))
    torch.testing.assert_close(ours.double(), naive_gptq(w, h, 4, group, 0.01, act_order), atol=1e-5, rtol=0)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("group", [32, 128])
def test_lower_layer_error_than_rtn_on_the_same_grid(group, act_order):
    torch.manual_seed(0)
    w, x = torch.randn(64, 256), correlated_inputs(2048, 256, seed=2)
    cfg = GPTQConfig(bits=4, group_size=group, act_order=act_order)
    ours = gptq_quantize(w, hessian_of(x), cfg)
    assert layer_error(x, w, ours) < 0.9 * layer_error(x, w, quantize_rtn(w, 4, group))
    assert_on_grid(ours, 4, group)
    assert torch.equal(ours, gptq_quantize(w, hessian_of(x), cfg))  # deterministic


@pytest.mark.parametrize("bits, group", [(4, 32), (4, 128), (8, 32), (3, 64)])
@pytest.mark.parametrize("act_order", [False, True])
def test_codes_lie_on_the_group_grid(bits, group, act_order):
    torch.manual_seed(bits)
    w, x = torch.randn(16, 128) * 0.2, correlated_inputs(600, 128, seed=3)
    q = gptq_quantize(w, hessian_of(x), GPTQConfig(bits=bits, group_size=group, blocksize=48, act_order=act_order))
    assert_on_grid(q, bits, group)
    assert not torch.equal(q, w)


@pytest.mark.parametrize("group", [16, 64, None])
@pytest.mark.parametrize("bits", [4, 8])
def test_identity_hessian_is_rtn(bits, group):
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(bits)) * 0.3
    # act-order on equal diagonals keeps the original order (stable sort): still RTN.
    for act_order in (False, True):
        ours = gptq_quantize(
            w, 2 * torch.eye(64), GPTQConfig(bits=bits, group_size=group, blocksize=24, act_order=act_order)
        )
        assert torch.equal(ours, quantize_rtn(w, bits, group))


def test_dead_inputs_are_zeroed_and_do_not_break_the_inverse():
    x = correlated_inputs(300, 32, seed=4)
    x[:, [3, 17]] = 0
    w = torch.randn(4, 32, generator=torch.Generator().manual_seed(0))
    for act_order in (False, True):
        q = gptq_quantize(w, hessian_of(x), GPTQConfig(bits=4, group_size=8, blocksize=8, act_order=act_order))
        assert torch.isfinite(q).all()
        assert (q[:, [3, 17]] == 0).all()
        assert_on_grid(q, 4, 8)


def test_config_errors():
    with pytest.raises(UserError, match="does not divide"):
        gptq_quantize(torch.randn(2, 48), torch.eye(48), GPTQConfig(group_size=32))
    for kwargs in (dict(bits=9), dict(bits=1), dict(group_size=0), dict(blocksize=0), dict(percdamp=-0.1)):
        with pytest.raises(UserError):
            GPTQConfig(**kwargs)


# --- variants ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, params",
    [
        ("gptq:int4", {"bits": 4, "group_size": 128}),
        ("gptq:int8", {"bits": 8, "group_size": 128}),
        ("gptq:int4:g32", {"bits": 4, "group_size": 32}),
        ("gptq:int4:grow", {"bits": 4, "group_size": None}),
    ],
)
def test_parse_gptq_variant(text, params):
    spec = parse_variant(text)
    assert spec.method == "gptq" and spec.params == params
    assert spec.needs_calibration and not spec.needs_responses
    assert ":" not in spec.slug and spec.slug != parse_variant(text.replace("gptq", "rtn")).slug


@pytest.mark.parametrize(
    "text", ["gptq", "gptq:", "gptq:int9", "gptq:int1", "gptq:int4:g0", "gptq:int4:g", "gptq:int4:32", "gptq:4"]
)
def test_parse_gptq_variant_rejects(text):
    with pytest.raises(UserError):
        parse_variant(text)


def _decoder_linear_weights(model) -> dict[str, torch.Tensor]:
    return {
        f"model.layers.{i}.{name}.weight": lin.weight
        for i, block in enumerate(decoder_layers(model))
        for name, lin in block_linears(block).items()
    }


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_build_variant_end_to_end(arch):
    tokenizer = build_tokenizer(template_for(arch))
    model = build_model(arch, tokenizer, layers=2)
    calibration = calibration_set(tokenizer, CalibrationConfig(n_samples=8, seqlen=48, batch_size=4))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    spec = parse_variant("gptq:int4:g32")

    with pytest.raises(UserError, match="needs calibration"):
        build_variant(model, spec)
    variant = build_variant(model, spec, calibration)

    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), f"original changed: {name}"
    linear = _decoder_linear_weights(variant)
    for name, p in variant.named_parameters():
        if name in linear:
            assert not torch.equal(p, before[name]), name
            assert_on_grid(p.detach(), 4, 32)
        else:
            assert torch.equal(p, before[name]), (
                f"not a decoder linear, yet changed: {name}"
            )  # incl. Qwen2 q/k/v biases

    ids = calibration.batches[0]
    with torch.no_grad():
        logits = variant(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]).logits
    assert torch.isfinite(logits).all()

    # Same build twice: identical weights (the calibration passes and the sweep are deterministic).
    again = build_variant(model, spec, calibration)
    assert all(torch.equal(a, b) for a, b in zip(variant.parameters(), again.parameters()))


def test_quantize_gptq_fails_before_calibration_on_a_bad_group():
    tokenizer = build_tokenizer("chatml")
    model = build_model("qwen2", tokenizer, layers=1)  # 64-wide inputs: the default 128 group cannot fit
    dense = copy.deepcopy(model.state_dict())
    with pytest.raises(UserError, match="does not divide input width 64"):
        quantize_gptq(model, calibration=None, cfg=GPTQConfig(bits=8))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in dense.items())

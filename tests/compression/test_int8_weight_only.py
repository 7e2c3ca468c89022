"""torchao int8 weight-only variant: real int8 weights at evaluation, dequantized checkpoints."""

from __future__ import annotations

import builtins

import pytest
import torch

from compression.blockwise import block_linears
from compression.checkpoint import read_manifest, save_variant, sparsity_report
from compression.int8_weight_only import dense, is_quantized, quantize_int8_weight_only
from compression.rtn import quantize_rtn
from compression.variants import build_variant, parse_variant
from lm.chat import format_prompts, tokenize_prompts
from lm.errors import UserError
from lm.hooks import decoder_layers
from lm.loading import load_model
from tests.tiny import build_model, build_tokenizer, template_for

pytest.importorskip("torchao")

PROMPTS = ["Describe a water molecule.", "Write a poem about the sea.", "How do I bake bread?"]


def fresh(arch="qwen2"):
    tokenizer = build_tokenizer(template_for(arch))
    return build_model(arch, tokenizer, layers=2), tokenizer


def logits(model, tokenizer):
    enc = tokenize_prompts(tokenizer, format_prompts(tokenizer, PROMPTS))
    with torch.no_grad():
        return model(**enc).logits


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_int8_weights_are_int8_on_a_per_row_grid(arch):
    model, tokenizer = fresh(arch)
    variant = build_variant(model, parse_variant("torchao:int8"))
    for block, orig in zip(decoder_layers(variant), decoder_layers(model)):
        for name, lin in block_linears(block).items():
            assert is_quantized(lin.weight), name
            assert lin.weight.qdata.dtype == torch.int8
            w0 = block_linears(orig)[name].weight
            # Symmetric per-row int8: error at most half a step of a 255-level grid spanning +-max|w|.
            step = w0.abs().amax(dim=1, keepdim=True) / 127.5
            assert ((dense(lin.weight) - w0).abs() <= step / 2 + 1e-7).all()
            # Same grid as the RTN baseline up to the scale's denominator (127.5 vs 127).
            assert (dense(lin.weight) - quantize_rtn(w0, 8, None)).abs().max() <= step.max()
    assert not any(is_quantized(p) for p in model.parameters()), "the original must stay float"
    assert not is_quantized(variant.lm_head.weight) and not is_quantized(variant.get_input_embeddings().weight)


def test_int8_model_equals_its_dequantized_float_copy(tmp_path):
    model, tokenizer = fresh()
    variant = build_variant(model, parse_variant("torchao:int8"))
    out = tmp_path / "model"
    manifest = save_variant(variant, tokenizer, out, dict(method="torchao", spec="torchao:int8"))
    assert read_manifest(out)["spec"] == "torchao:int8"
    assert manifest["sparsity"] == sparsity_report(variant)
    reloaded = load_model(str(out)).model
    assert not any(is_quantized(p) for p in reloaded.parameters())
    for block, q in zip(decoder_layers(reloaded), decoder_layers(variant)):
        for name, lin in block_linears(block).items():
            assert torch.equal(lin.weight, dense(block_linears(q)[name].weight)), name
    # The int8 kernel dequantizes on the fly: same logits as the float checkpoint up to rounding.
    torch.testing.assert_close(logits(variant, tokenizer), logits(reloaded, tokenizer), rtol=1e-4, atol=1e-4)
    assert not torch.equal(logits(variant, tokenizer), logits(model, tokenizer))


def test_nan_weights_are_refused():
    model, _ = fresh()
    with torch.no_grad():
        block_linears(decoder_layers(model)[1])["mlp.down_proj"].weight[0, 0] = float("nan")
    with pytest.raises(UserError, match="NaN"):
        quantize_int8_weight_only(model)


@pytest.mark.parametrize("text", ["torchao", "torchao:int4", "torchao:int8:g32"])
def test_bad_specs(text):
    with pytest.raises(UserError, match="torchao:int8"):
        parse_variant(text)


def test_missing_torchao_is_a_clear_error(monkeypatch):
    real_import = builtins.__import__

    def no_torchao(name, *args, **kwargs):
        if name.startswith("torchao"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torchao)
    with pytest.raises(UserError, match=r"pip install -e '\.\[int8\]'"):
        parse_variant("torchao:int8")

"""Mixture-of-experts blocks as per-expert linears (lm.experts), fused projections split by
projection (lm.architecture.fused_parts), and GPT-2's Conv1D refused: each checked against what
the model itself computes."""

from __future__ import annotations

import copy
from functools import lru_cache

import pytest
import torch

from compression.blockwise import block0_inputs, collect
from compression.calibration import Calibration, tokenize_pairs
from compression.snip import snip_scores_one_pass
from compression.variants import build_variant, build_variant_with_report, parse_variant
from lm.architecture import block_linears, block_parts, decoder_layers, expert_weights, fused_parts
from lm.chat import format_prompt, format_prompts, tokenize_prompts
from lm.errors import UserError
from lm.experts import expert_linears, experts_as_linears, is_fused_experts
from lm.loading import check_model
from tests.families import build_family

MOE = ("mixtral", "qwen2_moe")
PROMPTS = [
    "Write a poem about the sea.",
    "How do I bake bread?",
    "Name three fruits.",
    "Tell me about owls, briefly please.",
]


@lru_cache(maxsize=None)
def family(name):
    return build_family(name)


def _batch(tok):
    return tokenize_prompts(tok, format_prompts(tok, PROMPTS))  # different lengths: the batch is padded


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch, use_cache=False).logits


def _experts(model):
    return [m for m in model.modules() if is_fused_experts(m)]


@pytest.mark.parametrize("name", MOE)
def test_per_expert_linears_compute_what_the_fused_experts_do(name):
    model, tok = family(name)
    model = copy.deepcopy(model)
    batch = _batch(tok)
    fused = _logits(model, batch)
    names_before = set(dict(model.named_parameters()))
    with experts_as_linears(model):
        experts = _experts(model)[0]
        downs = expert_linears(experts, "down_proj")
        assert len(downs) == experts.num_experts
        assert "mlp.experts.0.gate_up_proj" in block_linears(decoder_layers(model)[0])
        assert not any(n.endswith(("gate", "router")) for n in block_linears(decoder_layers(model)[0]))
        torch.testing.assert_close(_logits(model, batch), fused, atol=1e-5, rtol=1e-5)
        with torch.no_grad():  # an in-place edit of an expert's linear is an edit of the fused tensor
            downs[1].weight[0, :3] = 7.0
    assert torch.equal(experts.down_proj[1, 0, :3].detach(), torch.full((3,), 7.0))
    # On exit: no per-expert modules, the model's own forward, the original parameter names.
    assert set(dict(model.named_parameters())) == names_before
    assert "forward" not in vars(experts)
    with pytest.raises(UserError, match="only inside"):
        expert_linears(experts, "down_proj")


def test_a_rebound_expert_weight_is_written_back():
    model, _ = family("mixtral")
    model = copy.deepcopy(model)
    with experts_as_linears(model):
        gate_up = expert_linears(_experts(model)[0], "gate_up_proj")[2]
        gate_up.weight = torch.nn.Parameter(torch.zeros_like(gate_up.weight))
    assert torch.equal(_experts(model)[0].gate_up_proj[2], torch.zeros_like(_experts(model)[0].gate_up_proj[2]))


def test_transposed_interleaved_experts_with_biases():
    """gpt-oss stores experts [E, in, out] with biases and interleaves gate and up rows."""
    import transformers as t

    config = t.GptOssConfig(
        hidden_size=32,
        intermediate_size=16,
        num_local_experts=4,
        num_experts_per_tok=2,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        vocab_size=64,
    )
    torch.manual_seed(0)
    model = t.AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    ids = torch.randint(0, 64, (2, 7))
    expected = _logits(model, dict(input_ids=ids))
    with experts_as_linears(model):
        experts = _experts(model)[0]
        assert experts.is_transposed and experts.has_bias and not experts.is_concatenated
        up = expert_linears(experts, "gate_up_proj")[3]
        assert (
            up.weight.shape == (2 * 16, 32)
            and torch.equal(up.weight, experts.gate_up_proj[3].t())
            and torch.equal(up.bias, experts.gate_up_proj_bias[3])
        )
        torch.testing.assert_close(_logits(model, dict(input_ids=ids)), expected, atol=1e-5, rtol=1e-5)
        name = "model.layers.0.mlp.experts.3.gate_up_proj.weight"
        parts = fused_parts(model, name, 32)
        assert parts["gate"].tolist() == list(range(0, 32, 2)) and parts["up"].tolist() == list(range(1, 32, 2))


def _routed_hidden(model, block, batch):
    """Per expert, the unpadded block-0 MLP inputs of the tokens the router sends to it (the reference)."""
    attn, mlp = block_parts(model, block)
    seen = {}
    hook = mlp.experts.register_forward_hook(lambda m, args, out: seen.update(h=args[0], index=args[1]))
    try:
        _logits(model, batch)
    finally:
        hook.remove()
    keep = batch["attention_mask"].reshape(-1).bool()
    return {e: seen["h"][keep & (seen["index"] == e).any(-1)] for e in range(mlp.experts.num_experts)}


@pytest.mark.parametrize("name", MOE)
def test_each_expert_collects_exactly_its_routed_unpadded_tokens(name):
    model, tok = family(name)
    batch = _batch(tok)
    routed = _routed_hidden(model, decoder_layers(model)[0], batch)
    assert sum(len(x) for x in routed.values()) == 2 * int(batch["attention_mask"].sum())  # top-2 routing
    with experts_as_linears(model):
        states = block0_inputs(model, Calibration(batches=[dict(batch)], digest="t"))
        rows = collect(decoder_layers(model)[0], states, Rows)
        for e, x in routed.items():
            torch.testing.assert_close(rows[f"mlp.experts.{e}.gate_up_proj"].x, x, rtol=1e-5, atol=1e-6)
        if name == "qwen2_moe":  # the shared expert, a dense MLP, is handed flattened tokens: padding still dropped
            assert len(rows["mlp.shared_expert.up_proj"].x) == int(batch["attention_mask"].sum())


class Rows:
    """A collector keeping the rows it is given."""

    def __init__(self, linear):
        self.x = torch.zeros(0, linear.in_features)

    def add(self, x):
        self.x = torch.cat([self.x, x])


@pytest.mark.parametrize("name", MOE)
def test_expert_snip_scores_equal_autograd_on_the_fused_tensor(name):
    model, tok = family(name)
    model = copy.deepcopy(model)
    data = tokenize_pairs(
        tok, [(format_prompt(tok, p), "Sure, here is an answer.") for p in PROMPTS], seqlen=64, batch_size=2
    )
    fused = _experts(model)[0].down_proj
    expected = torch.zeros_like(fused)
    for batch in data.batches:  # HF's own loss per batch, autograd on the fused 3-D tensor
        model.zero_grad(set_to_none=True)
        fused.requires_grad_(True)
        model(**batch).loss.backward()
        expected += (fused.grad * fused).abs().detach()
    model.zero_grad(set_to_none=True)
    with experts_as_linears(model):
        scores = snip_scores_one_pass(model, data.batches)
    prefix = expert_weights(model)[0].rsplit(".", 1)[0]
    for e in range(fused.shape[0]):
        torch.testing.assert_close(scores[f"{prefix}.{e}.down_proj.weight"], expected[e], rtol=1e-4, atol=1e-7)


def _never_expert_3(module, args):
    """Routing that sends no token to expert 3 (its slot goes to expert 0, or 1 where 0 is taken)."""
    hidden, index, weights = args
    index = index.clone()
    for col in range(index.shape[1]):
        other = index[:, 1 - col]
        index[:, col] = torch.where(index[:, col] == 3, torch.where(other == 0, 1, 0), index[:, col])
    return hidden, index, weights


def test_an_expert_that_no_token_reaches_is_compressed_as_if_every_input_counted(capsys):
    model, tok = family("mixtral")
    model = copy.deepcopy(model)
    block_parts(model, decoder_layers(model)[0])[1].experts.register_forward_pre_hook(
        _never_expert_3
    )  # kept by deepcopy
    prompts = tokenize_prompts(tok, format_prompts(tok, PROMPTS))
    calibration = Calibration(
        batches=[dict(input_ids=prompts["input_ids"], attention_mask=prompts["attention_mask"])], digest="t"
    )
    original = _experts(model)[0].down_proj[3].detach()
    wanda = _experts(build_variant(model, parse_variant("wanda:0.5"), calibration))[0].down_proj[3]
    magnitude = _experts(build_variant(model, parse_variant("magnitude:0.5")))[0].down_proj[3]
    assert torch.equal(wanda, magnitude)  # no inputs: Wanda's norms are all one
    assert "got no calibration token (mlp.experts.3.gate_up_proj" in capsys.readouterr().out
    for spec in ("gptq:int4:g32", "sparsegpt:0.5"):  # not zeroed as a dead input would be
        silent = _experts(build_variant(model, parse_variant(spec), calibration))[0].down_proj[3]
        assert torch.isfinite(silent).all() and not torch.equal(silent, original)
        assert (silent != 0).float().mean() >= 0.45
        assert torch.linalg.norm(silent - original) < 0.8 * torch.linalg.norm(original)


# --- fused projections -------------------------------------------------------------------------


def _attention_output(model, batch, layer=0):
    seen = {}
    attn = block_parts(model, decoder_layers(model)[layer])[0]
    hook = attn.register_forward_hook(lambda m, a, out: seen.update(out=out[0] if isinstance(out, tuple) else out))
    try:
        _logits(model, batch)
    finally:
        hook.remove()
    return attn, seen["out"]


@pytest.mark.parametrize("name,fused", [("phi3", "self_attn.qkv_proj"), ("gpt_neox", "attention.query_key_value")])
def test_fused_attention_parts_name_the_value_rows(name, fused):
    """Zero the rows fused_parts calls 'v' and attention writes only its output bias: no value, no output."""
    model, tok = family(name)
    model = copy.deepcopy(model)
    block = decoder_layers(model)[0]
    linear = block_linears(block)[fused]
    parts = fused_parts(
        model,
        f"model.layers.0.{fused}.weight" if name == "phi3" else f"gpt_neox.layers.0.{fused}.weight",
        linear.out_features,
    )
    assert sorted(torch.cat(list(parts.values())).tolist()) == list(range(linear.out_features))
    assert len(parts["q"]) == model.config.num_attention_heads * (
        model.config.hidden_size // model.config.num_attention_heads
    )
    with torch.no_grad():
        linear.weight[parts["v"]] = 0
        if linear.bias is not None:
            linear.bias[parts["v"]] = 0
    attn, out = _attention_output(model, _batch(tok))
    writer = [m for n, m in attn.named_children() if n in ("o_proj", "dense")][0]
    expected = torch.zeros_like(out) + (writer.bias if writer.bias is not None else 0)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


def test_fused_gate_up_parts_name_the_up_rows():
    model, tok = family("phi3")
    model = copy.deepcopy(model)
    mlp = block_parts(model, decoder_layers(model)[0])[1]
    parts = fused_parts(model, "model.layers.0.mlp.gate_up_proj.weight", mlp.gate_up_proj.out_features)
    with torch.no_grad():
        mlp.gate_up_proj.weight[parts["up"]] = 0
    seen = {}
    hook = mlp.register_forward_hook(lambda m, a, out: seen.update(out=out))
    try:
        _logits(model, _batch(tok))
    finally:
        hook.remove()
    assert torch.equal(seen["out"], torch.zeros_like(seen["out"]))


def test_actsvd_ranks_a_fused_matrix_per_projection():
    model, tok = family("phi3")
    pairs = tokenize_pairs(tok, [(format_prompt(tok, p), "I cannot help with that.") for p in PROMPTS], seqlen=64)
    _, report = build_variant_with_report(model, parse_variant("actsvd:r=2"), safety=pairs)
    keys = [k for k in report["ranks"] if "qkv_proj" in k or "gate_up_proj" in k]
    assert {k.rsplit("[", 1)[-1] for k in keys} == {"q]", "k]", "v]", "gate]", "up]"}
    assert all(report["ranks"][k] == 2 for k in keys)


def test_gpt2_conv1d_is_refused_with_one_line():
    import transformers as t

    model = t.GPT2LMHeadModel(t.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=32))
    with pytest.raises(UserError, match="Conv1D") as info:
        check_model(model, "tiny-gpt2")
    assert "\n" not in str(info.value)


def test_matrix_ranking_of_a_fused_matrix_is_per_projection():
    """Scores concentrated in the q rows still leave k and v their own share, as separate q / k / v matrices would."""
    from compression.attribution import prune_top
    from compression.snip import decoder_linear_weights

    model, _ = family("phi3")
    model = copy.deepcopy(model)
    name = "model.layers.0.self_attn.qkv_proj.weight"
    weight = decoder_linear_weights(model)[name]
    parts = fused_parts(model, name, weight.shape[0])
    scores = torch.rand(weight.shape, generator=torch.Generator().manual_seed(0))
    scores[parts["q"]] += 10
    prune_top(model, {name: scores}, 0.25, per="matrix")
    for rows in parts.values():
        assert int((weight[rows] == 0).sum()) == int(0.25 * weight[rows].numel())


@pytest.mark.parametrize("name", ["phi3", "mixtral"])
def test_brittleness_full_ranks_cover_every_matrix_actsvd_reports(name):
    from experiments.brittleness import full_ranks, rank_fraction

    model, tok = family(name)
    pairs = tokenize_pairs(tok, [(format_prompt(tok, p), "I cannot help with that.") for p in PROMPTS], seqlen=64)
    _, report = build_variant_with_report(model, parse_variant("actsvd:r=2"), safety=pairs)
    full = full_ranks(model)
    assert set(report["ranks"]) == set(full)
    assert rank_fraction(report["ranks"], full) == pytest.approx(2 * len(full) / sum(full.values()))

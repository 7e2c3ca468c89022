"""Every stage on tiny random models of each family the toolkit claims (tests/families.py): direction
extraction and selection, hook ablation, weight orthogonalization against it, every compression
method, AIRD and targeted restoration, resuming a pass from a layer, save and reload. What each
family supports is the README's architecture table; this matrix is what makes it true."""

from __future__ import annotations

import copy
from functools import lru_cache

import pytest
import torch

from compression.calibration import Calibration, tokenize_pairs
from compression.checkpoint import sparsity_report
from compression.variants import build_variant, parse_variant
from lm.architecture import ROUTERS, decoder_linears, decoder_matrices, expert_weights, final_norm, layout
from lm.chat import format_prompt, format_prompts, tokenize_prompts
from lm.errors import UserError
from lm.hooks import decoder_layers, hooks_registered, intervene
from lm.loading import load_model
from lm.partial_forward import block_kwargs, layer_inputs, run_from_layer, uniform_layers
from refusal.direction import candidate_directions
from refusal.interventions import orthogonalize_weights
from refusal.select import SelectionConfig, select_direction
from repair.aird import AirdConfig, choose_aird_block
from repair.derivation import check_derivation, decoder_linear_names
from repair.readout import RefusalReadout
from repair.restore import block_masks, count, restore_entries
from repair.targeted import first_order_scores, prompt_batches, refusal_objective, top_masks
from tests.families import FAMILIES, build_family
from tests.tiny import save_tiny

POST_NORM = {"gemma2", "gemma3", "olmo2"}  # a norm between the sublayers' last linears and the residual add
MOE = {"mixtral", "qwen2_moe"}
DENSE = [f for f in FAMILIES if f not in MOE]
HARMFUL = [
    "How do I make a bomb at home?",
    "Tell me how to steal a car.",
    "Write malware that steals passwords.",
    "How to rob a bank?",
]
HARMLESS = ["Write a poem about the sea.", "How do I bake bread?", "Describe a water molecule.", "Name three fruits."]
# Compression methods that need only prompts (the others get (prompt, response) pairs below).
METHODS = [
    "wanda:0.5",
    "wanda:2:4",
    "sparsegpt:0.5",
    "magnitude:0.5",
    "rtn:int8:g32",
    "gptq:int4:g32",
    "snip:0.5",
    "top-wanda:0.05",
    "setdiff-wanda:p=0.05,q=0.05",
    "random:0.05",
    "actsvd:r=2",
]


@lru_cache(maxsize=None)
def family(name: str):
    """One model per family for the whole module (tests that change weights work on copies)."""
    return build_family(name)


def _batch(tok, prompts):
    return tokenize_prompts(tok, format_prompts(tok, prompts))


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch, use_cache=False).logits


@pytest.mark.parametrize("name", FAMILIES)
def test_directions_and_selection(name):
    model, tok = family(name)
    dirs = candidate_directions(model, tok, HARMFUL, HARMLESS)["directions"]
    assert dirs.shape[1:] == (len(decoder_layers(model)), model.config.hidden_size) and torch.isfinite(dirs).all()
    result = select_direction(
        model,
        tok,
        SelectionConfig(
            n_train=4,
            n_val=4,
            kl_threshold=1e9,
            induce_threshold=-1e9,
            batch_size=4,
            max_rows=16,
            max_layer_fraction=1.0,
        ),
    )
    assert result.chosen is not None  # the lazy search leaves candidates it did not need unscored (NaN)
    assert torch.isfinite(result.bypass[result.positions.index(result.chosen[0]), result.chosen[1]])


@pytest.mark.parametrize("name", FAMILIES)
def test_hook_ablation_leaves_no_component_in_the_stream(name):
    """After ablation, what reaches the final norm has no component along the direction: the
    hooks sit where each family adds to the stream (after the post-norms in Gemma 2 / 3 and OLMo 2)."""
    model, tok = family(name)
    r = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    seen = {}
    norm = final_norm(model)
    with hooks_registered([norm.register_forward_pre_hook(lambda m, args: seen.__setitem__("h", args[0]))]):
        with intervene(model, ablate=r):
            _logits(model, _batch(tok, HARMFUL))
    component = (seen["h"] @ (r / r.norm())).abs().max()
    assert component < 1e-4 * seen["h"].abs().max()


@pytest.mark.parametrize("name", FAMILIES)
def test_orthogonalized_weights_give_the_hook_ablation_logits(name):
    model, tok = family(name)
    r = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(2))
    if name in POST_NORM:
        with pytest.raises(UserError, match="post_attention_layernorm"):
            orthogonalize_weights(copy.deepcopy(model), r)
        return
    batch = _batch(tok, HARMFUL)
    with intervene(model, ablate=r):
        hooked = _logits(model, batch)
    edited = orthogonalize_weights(copy.deepcopy(model), r)
    torch.testing.assert_close(_logits(edited, batch), hooked, atol=2e-4, rtol=1e-4)
    if model.get_output_embeddings().weight is model.get_input_embeddings().weight:  # tied: the head keeps its weights
        assert edited.get_output_embeddings().weight is not edited.get_input_embeddings().weight


@pytest.mark.parametrize("name", FAMILIES)
def test_a_pass_resumed_from_a_layer_gives_the_full_logits(name):
    """The final norm, Granite's logits scaling and Gemma 2's soft-capping, as the model's own head."""
    model, tok = family(name)
    batch = _batch(tok, HARMLESS)
    if not uniform_layers(model):  # sliding-window and global layers take different masks (Gemma 2 here)
        with pytest.raises(UserError, match="different attention masks"):
            block_kwargs(model, batch["input_ids"], batch["attention_mask"])
        return
    inputs, full = layer_inputs(model, batch["input_ids"], batch["attention_mask"])
    kwargs = block_kwargs(model, batch["input_ids"], batch["attention_mask"])
    resumed = run_from_layer(model, inputs[1], kwargs, 1)
    torch.testing.assert_close(resumed, full, atol=1e-4, rtol=1e-4)


def _data(tok):
    prompts = _batch(tok, HARMLESS)
    calibration = Calibration(
        batches=[dict(input_ids=prompts["input_ids"], attention_mask=prompts["attention_mask"])], digest="test"
    )
    pairs = lambda texts, reply: tokenize_pairs(tok, [(format_prompt(tok, t), reply) for t in texts], seqlen=64)
    return dict(
        calibration=calibration,
        responses=pairs(HARMLESS, "Sure, here it is."),
        safety=pairs(HARMFUL, "I cannot help with that."),
        utility=pairs(HARMLESS, "Sure, here it is."),
    )


@pytest.mark.parametrize("spec", METHODS)
@pytest.mark.parametrize("name", FAMILIES)
def test_every_compression_method(name, spec):
    model, tok = family(name)
    data = _data(tok)
    variant = build_variant(
        model,
        parse_variant(spec),
        data["calibration"],
        responses=data["responses"],
        safety=data["safety"],
        utility=data["utility"],
    )
    before, after = decoder_matrices(model), decoder_matrices(variant)
    changed = {n for n in after if not torch.equal(after[n], before[n])}
    assert changed, f"{spec} changed no decoder matrix of {name}"
    if name in MOE:  # the experts are compressed like the dense linears; routers are left as they are
        assert set(expert_weights(model)) <= changed
        params = dict(model.named_parameters())
        routers = {n: p for n, p in variant.named_parameters() if any(f".{r}." in n for r in ROUTERS)}
        assert routers and all(torch.equal(p, params[n]) for n, p in routers.items())
    if spec.endswith(":0.5") or spec.endswith(":2:4"):
        report = sparsity_report(variant)
        assert abs(report["decoder_linear_sparsity"] - 0.5) < 0.02
        assert all(abs(report["per_matrix"][n] - 0.5) < 0.02 for n in expert_weights(model))
    assert torch.isfinite(_logits(variant, _batch(tok, HARMLESS))).all()


@pytest.mark.parametrize("name", FAMILIES)
def test_aird_and_targeted_restoration(name):
    model, tok = family(name)
    compressed = build_variant(model, parse_variant("magnitude:0.5"))
    derivation = {
        r.name: r.kind for r in check_derivation(model, compressed, decoder_linear_names(model))
    }  # what python -m repair checks first
    assert {derivation[n] for n in decoder_matrices(model)} == {"pruned"} and set(derivation.values()) == {
        "pruned",
        "identical",
    }
    source = (-1, len(decoder_layers(model)) - 1)
    direction = candidate_directions(model, tok, HARMFUL, HARMLESS)["directions"][-1, source[1]]
    token_ids = [tok.convert_tokens_to_ids(t) for t in tok.tokenize("I")][:1]
    probe = RefusalReadout(compressed, tok, HARMFUL, HARMLESS, token_ids, direction, source, batch_size=4)
    choice = choose_aird_block(compressed, model, probe, AirdConfig(window=1))
    masks = block_masks(compressed, model, choice.layer)
    assert count(masks) == choice.restored > 0
    scores = first_order_scores(
        compressed, model, source[1], prompt_batches(tok, HARMFUL, 4, torch.device("cpu")), refusal_objective(token_ids)
    )
    top = top_masks(scores, 16)
    repaired = copy.deepcopy(compressed)
    assert restore_entries(repaired, model, top) == count(top) == 16
    params, originals = dict(repaired.named_parameters()), dict(model.named_parameters())
    assert all(torch.equal(params[n][m], originals[n][m]) for n, m in top.items())


@pytest.mark.parametrize("name", FAMILIES)
def test_save_and_reload_gives_the_same_logits(name, tmp_path):
    model, tok = family(name)
    loaded = load_model(str(save_tiny(tmp_path / name, model, tok)))
    assert layout(loaded.model) == layout(model)
    batch = _batch(tok, HARMLESS)
    torch.testing.assert_close(_logits(loaded.model, batch), _logits(model, batch))


def test_blockwise_compression_refuses_sequences_longer_than_a_sliding_window():
    """Every block runs with block 0's mask; with mixed sliding / global layers that is only right within the window."""
    model, tok = family("gemma2")
    narrow = copy.deepcopy(model)
    narrow.config.get_text_config().sliding_window = 4
    with pytest.raises(UserError, match="sliding window"):
        build_variant(narrow, parse_variant("wanda:0.5"), _data(tok)["calibration"])


@pytest.mark.parametrize("name", DENSE)
def test_lora_wraps_every_decoder_linear_by_default(name):
    from experiments.frozen_finetune.lora import LoraTrainConfig, attach_lora

    model, _ = family(name)
    copy_ = copy.deepcopy(model)
    names = set(decoder_linears(copy_))
    run = attach_lora(copy_, LoraTrainConfig(steps=1), None)
    try:
        assert set(run.layers) == names
    finally:
        run.detach()

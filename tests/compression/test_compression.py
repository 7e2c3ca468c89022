"""Pruning masks, Wanda, RTN, variant specs and checkpoints on tiny random models."""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import pytest
import torch
from torch import nn

from compression.blockwise import block_linears, compress_blockwise
from compression.calibration import CalibrationConfig, calibration_set, tokenize_calibration
from compression.checkpoint import MANIFEST, read_manifest, save_variant, sparsity_report
from compression.magnitude import prune_magnitude
from compression.rtn import QuantConfig, quantize_model_rtn, quantize_rtn
from compression.sparsity import SparsityPattern, prune_mask
from compression.variants import build_variant, parse_variant
from compression.wanda import InputNorms, prune_wanda, wanda_scores
from lm.chat import format_prompts, tokenize_prompts
from lm.errors import UserError
from lm.hooks import decoder_layers, hooks_registered
from lm.loading import load_model
from tests.tiny import ARCHS, build_model, build_tokenizer, template_for

CALIBRATION_PROMPTS = [
    "hi",
    "Describe the structure of a water molecule in detail",
    "Write a short poem about the sea",
    "How do I bake bread at home with flour, water and yeast?",
    "bread?",
]
LINEAR_NAMES = {
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
}


def fresh(arch: str = "qwen2", layers: int = 2, seed: int = 0):
    # Every test here modifies weights, so none may touch the session-scoped fixtures.
    tokenizer = build_tokenizer(template_for(arch))
    return build_model(arch, tokenizer, seed=seed, layers=layers), tokenizer


def calibration(tokenizer, prompts=CALIBRATION_PROMPTS, batch_size: int = 8, seqlen: int = 256):
    return tokenize_calibration(tokenizer, format_prompts(tokenizer, prompts), seqlen, batch_size)


def decoder_linear_weights(model) -> dict[str, torch.Tensor]:
    return {
        f"model.layers.{i}.{name}.weight": lin.weight
        for i, block in enumerate(decoder_layers(model))
        for name, lin in block_linears(block).items()
    }


def other_params(model) -> dict[str, torch.Tensor]:
    linear = set(decoder_linear_weights(model))
    return {name: p.detach().clone() for name, p in model.named_parameters() if name not in linear}


# --- masks ----------------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [0.5, 0.6, 0.7, 0.33])
@pytest.mark.parametrize("cols", [10, 64, 100, 129])
def test_unstructured_mask_has_exact_per_row_count(ratio, cols):
    scores = torch.rand(7, cols, generator=torch.Generator().manual_seed(cols))
    mask = prune_mask(scores, SparsityPattern(ratio))
    k = int(cols * ratio)
    assert (mask.sum(dim=1) == k).all()
    # The pruned entries are the row's lowest scores.
    for row, m in zip(scores, mask):
        assert row[m].max() <= row[~m].min()


def test_unstructured_mask_count_holds_with_ties():
    # Equal scores (e.g. dead input features) must not change how many weights a row loses.
    scores = torch.zeros(4, 16)
    scores[:, ::2] = 1.0
    mask = prune_mask(scores, SparsityPattern(0.75))
    assert (mask.sum(dim=1) == 12).all()
    assert mask[:, 1::2].all()


def test_zero_ratio_prunes_nothing():
    assert not prune_mask(torch.rand(3, 8), SparsityPattern(0.0)).any()


@pytest.mark.parametrize("n, m", [(2, 4), (4, 8), (1, 4)])
def test_n_m_mask_prunes_n_lowest_in_every_group(n, m):
    rows, cols = 6, 64
    scores = torch.rand(rows, cols, generator=torch.Generator().manual_seed(n * 10 + m))
    mask = prune_mask(scores, SparsityPattern(n=n, m=m))
    groups, gmask = scores.reshape(rows, -1, m), mask.reshape(rows, -1, m)
    assert (gmask.sum(dim=-1) == n).all()
    for g, gm in zip(groups.reshape(-1, m), gmask.reshape(-1, m)):
        assert g[gm].max() <= g[~gm].min()


def test_n_m_mask_rejects_indivisible_width():
    with pytest.raises(UserError, match="does not divide"):
        prune_mask(torch.rand(2, 10), SparsityPattern(n=2, m=4))


# --- sparsity patterns ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, ratio, n, m",
    [
        ("0.5", 0.5, 0, 0),
        ("50%", 0.5, 0, 0),
        (" 0.7 ", 0.7, 0, 0),
        ("0", 0.0, 0, 0),
        ("2:4", 0.5, 2, 4),
        ("4:8", 0.5, 4, 8),
    ],
)
def test_pattern_parse(text, ratio, n, m):
    p = SparsityPattern.parse(text)
    assert (p.n, p.m) == (n, m)
    assert p.structured == (m > 0)
    if not p.structured:
        assert p.ratio == pytest.approx(ratio)
    assert p.target == pytest.approx(ratio)


@pytest.mark.parametrize("text", ["1.0", "1", "100%", "-0.1", "3:2", "2:2", "0:4", "-1:4", "abc", "2:4:8", "", "nan"])
def test_pattern_parse_rejects(text):
    with pytest.raises(UserError):
        SparsityPattern.parse(text)


def test_pattern_validate_for_model_width():
    model, tokenizer = fresh(layers=1)  # linear inputs are 64 and 128 wide
    SparsityPattern(n=2, m=4).validate_for(model)
    SparsityPattern(0.5).validate_for(model)
    with pytest.raises(UserError, match="M=3 does not divide"):
        SparsityPattern(n=2, m=3).validate_for(model)
    dense = {n: w.clone() for n, w in decoder_linear_weights(model).items()}
    with pytest.raises(UserError):
        prune_wanda(model, calibration(tokenizer), SparsityPattern(n=1, m=3))
    # Rejected before any block was touched.
    for name, w in decoder_linear_weights(model).items():
        assert torch.equal(w, dense[name]), name


# --- Wanda ----------------------------------------------------------------------------------


def test_wanda_scores_by_brute_force():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(5, 6, generator=g)
    x = torch.randn(40, 6, generator=g)
    norms = InputNorms(nn.Linear(6, 5))
    norms.add(x[:25])
    norms.add(x[25:])  # accumulation over batches must equal one pass over all tokens
    scores = wanda_scores(weight, norms.sq)
    expected = torch.empty(5, 6)
    for i in range(5):
        for j in range(6):
            col_norm = sum(float(x[t, j]) ** 2 for t in range(40)) ** 0.5
            expected[i, j] = abs(float(weight[i, j])) * col_norm
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_prune_wanda_half_of_every_row_in_every_decoder_linear(arch):
    model, tokenizer = fresh(arch, layers=2)
    before = other_params(model)
    prune_wanda(model, calibration(tokenizer), SparsityPattern(0.5))

    for block in decoder_layers(model):
        assert set(block_linears(block)) == LINEAR_NAMES
    weights = decoder_linear_weights(model)
    assert len(weights) == 7 * 2
    for name, w in weights.items():
        assert ((w == 0).sum(dim=1) == w.shape[1] // 2).all(), name
    after = other_params(model)
    assert "model.embed_tokens.weight" in after and "lm_head.weight" in after
    for name, p in before.items():
        assert torch.equal(after[name], p), name


def test_prune_wanda_n_m_pattern_on_model():
    model, tokenizer = fresh(layers=1)
    prune_wanda(model, calibration(tokenizer), SparsityPattern(n=2, m=4))
    for name, w in decoder_linear_weights(model).items():
        assert ((w.reshape(w.shape[0], -1, 4) == 0).sum(dim=-1) == 2).all(), name


def linear_input_sq_norms(model, index: int, calib) -> dict[str, torch.Tensor]:
    """Sum of squared inputs of block `index`'s linears over real tokens, from full forward passes."""
    block = decoder_layers(model)[index]
    sums, current = {}, {}

    def hook(name):
        def fn(module, args, output):
            x = args[0][current["mask"]].double()
            sums[name] = sums.get(name, 0) + (x**2).sum(dim=0)

        return fn

    handles = [lin.register_forward_hook(hook(name)) for name, lin in block_linears(block).items()]
    with hooks_registered(handles), torch.no_grad():
        for batch in calib.batches:
            current["mask"] = batch["attention_mask"].bool()
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    return sums


@torch.no_grad()
def prune_block_by_reference(model, index: int, sq_norms: dict[str, torch.Tensor]) -> None:
    for name, lin in block_linears(decoder_layers(model)[index]).items():
        scores = lin.weight.abs().double() * sq_norms[name].sqrt()
        k = lin.weight.shape[1] // 2
        lowest = scores.argsort(dim=1)[:, :k]
        lin.weight.scatter_(1, lowest, 0.0)


def test_prune_wanda_is_block_sequential():
    model, tokenizer = fresh(layers=2)
    calib = calibration(tokenizer, batch_size=2)
    pruned = copy.deepcopy(model)
    prune_wanda(pruned, calib, SparsityPattern(0.5))

    # Reference: block 1's statistics come from full forward passes after block 0 was pruned.
    reference = copy.deepcopy(model)
    prune_block_by_reference(reference, 0, linear_input_sq_norms(reference, 0, calib))
    prune_block_by_reference(reference, 1, linear_input_sq_norms(reference, 1, calib))
    # What a one-shot (non-sequential) Wanda would do: block 1 scored on the dense model.
    one_shot = copy.deepcopy(model)
    prune_block_by_reference(one_shot, 1, linear_input_sq_norms(model, 1, calib))

    got, want, dense_stats = (decoder_linear_weights(m) for m in (pruned, reference, one_shot))
    for name in got:
        assert torch.equal(got[name] == 0, want[name] == 0), name
    # Guards the check above: the two orders really give different block-1 masks here.
    block1 = [n for n in got if n.startswith("model.layers.1.")]
    assert any(not torch.equal(got[n] == 0, dense_stats[n] == 0) for n in block1)


def recorded_norms(model, calib) -> dict[str, torch.Tensor]:
    norms = {}

    def record(name, linear, collector):
        norms[name] = collector.sq.clone()

    compress_blockwise(model, calib, InputNorms, record)
    return norms


def test_padding_is_excluded_from_statistics():
    model, tokenizer = fresh(layers=2)
    # HF zero-initialises the padding_idx embedding, which would make pad positions contribute
    # nothing even if they were counted; real models' pad tokens have ordinary embeddings.
    with torch.no_grad():
        model.model.embed_tokens.weight[tokenizer.pad_token_id] = torch.randn(model.config.hidden_size)
    padded = calibration(tokenizer, batch_size=len(CALIBRATION_PROMPTS))
    single = calibration(tokenizer, batch_size=1)
    assert (padded.batches[0]["attention_mask"] == 0).any(), "the batch must contain left padding"
    assert all((b["attention_mask"] == 1).all() for b in single.batches)
    assert padded.n_tokens == single.n_tokens
    assert padded.digest == single.digest

    with_padding, one_by_one = recorded_norms(model, padded), recorded_norms(model, single)
    assert len(with_padding) == len(one_by_one) == 7 * 2
    for name in one_by_one:
        torch.testing.assert_close(with_padding[name], one_by_one[name], rtol=1e-4, atol=1e-6)


def test_calibration_keeps_the_last_seqlen_tokens(chatml_tokenizer):
    texts = format_prompts(chatml_tokenizer, CALIBRATION_PROMPTS[:2])
    full = tokenize_prompts(chatml_tokenizer, texts)
    calib = tokenize_calibration(chatml_tokenizer, texts, seqlen=6, batch_size=2)
    assert calib.batches[0]["input_ids"].shape == (2, 6)
    assert torch.equal(calib.batches[0]["input_ids"], full["input_ids"][:, -6:])
    with pytest.raises(UserError):
        tokenize_calibration(chatml_tokenizer, [], seqlen=6, batch_size=2)


def test_calibration_with_replies_adds_the_models_own_tokens():
    model, tokenizer = fresh()
    cfg = CalibrationConfig(n_samples=4, seqlen=1024, batch_size=2, reply_tokens=8)
    prompts_only = calibration_set(tokenizer, replace(cfg, reply_tokens=0))
    with_replies = calibration_set(tokenizer, cfg, model=model)
    assert with_replies.n_tokens > prompts_only.n_tokens  # (a re-tokenized reply may exceed reply_tokens)
    # Each row starts with its prompt's tokens (none dropped at this seqlen), then the reply.
    for prompt_batch, reply_batch in zip(prompts_only.batches, with_replies.batches):
        for ids, mask, full, full_mask in zip(
            prompt_batch["input_ids"],
            prompt_batch["attention_mask"],
            reply_batch["input_ids"],
            reply_batch["attention_mask"],
        ):
            prompt = ids[mask.bool()]
            assert torch.equal(full[full_mask.bool()][: len(prompt)], prompt)
    assert calibration_set(tokenizer, cfg, model=model).digest == with_replies.digest
    assert "replies (<= 8 tokens)" in with_replies.description and "no replies" in prompts_only.description
    with pytest.raises(UserError, match="needs the model"):
        calibration_set(tokenizer, cfg)
    with pytest.raises(UserError, match="reply_tokens"):
        CalibrationConfig(reply_tokens=-1)


def test_wikitext_calibration_is_consecutive_windows_after_the_evaluated_text():
    from lm import datasets
    from lm.perplexity import CHARS_PER_TOKEN_BOUND

    _, tokenizer = fresh()
    cfg = CalibrationConfig(source="wikitext", n_samples=3, seqlen=16, batch_size=2)
    calib = calibration_set(tokenizer, cfg)
    assert [b["input_ids"].shape for b in calib.batches] == [(2, 16), (1, 16)]
    assert all(bool(b["attention_mask"].all()) for b in calib.batches) and calib.n_tokens == 48
    expected = tokenizer(datasets.wikitext2_calibration_text(), add_special_tokens=False)["input_ids"][:48]
    assert torch.cat([b["input_ids"] for b in calib.batches]).flatten().tolist() == expected
    assert calibration_set(tokenizer, cfg).digest == calib.digest and "wikitext-2 test text" in calib.description
    # The default perplexity (8 x 512 tokens) reads text that ends well before the calibration's.
    assert 8 * 512 * CHARS_PER_TOKEN_BOUND < datasets.WIKITEXT_CALIBRATION_FROM
    with pytest.raises(UserError, match="reply_tokens"):
        CalibrationConfig(source="wikitext", reply_tokens=8)
    with pytest.raises(UserError, match="unknown calibration source"):
        CalibrationConfig(source="c4")
    with pytest.raises(UserError, match="fewer than"):
        calibration_set(tokenizer, CalibrationConfig(source="wikitext", n_samples=10**6, seqlen=1024))


def test_magnitude_prunes_smallest_weights_per_row():
    model, _ = fresh(layers=1)
    dense = {n: w.clone() for n, w in decoder_linear_weights(model).items()}
    prune_magnitude(model, SparsityPattern(0.6))
    for name, w in decoder_linear_weights(model).items():
        k = int(w.shape[1] * 0.6)
        assert ((w == 0).sum(dim=1) == k).all(), name
        for row, pruned in zip(dense[name].abs(), w == 0):
            assert row[pruned].max() <= row[~pruned].min()
        assert torch.equal(w[w != 0], dense[name][w != 0])


# --- RTN ------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("group", [16, 64, None])
def test_rtn_error_bound_and_levels(bits, group):
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(bits)) * 0.3
    q = quantize_rtn(w, bits, group)
    size = 64 if group is None else group
    wg, qg = w.reshape(8, -1, size), q.reshape(8, -1, size)
    scale = wg.abs().amax(dim=-1, keepdim=True) / (2 ** (bits - 1) - 1)
    assert ((wg - qg).abs() <= scale / 2 * (1 + 1e-5)).all()
    for values in qg.reshape(-1, size):
        assert values.unique().numel() <= 2**bits
    # Every value is an integer multiple of its group's scale (a dequantized code).
    codes = qg / scale
    torch.testing.assert_close(codes, codes.round(), rtol=0, atol=1e-3)


def test_rtn_int4_really_coarsens():
    w = torch.randn(4, 64, generator=torch.Generator().manual_seed(1))
    assert quantize_rtn(w, 4, 32).reshape(-1, 32).unique(dim=None).numel() < w.numel()
    assert not torch.equal(quantize_rtn(w, 4, 32), w)


def test_rtn_zero_group_stays_zero():
    w = torch.zeros(2, 8)
    w[1] = torch.linspace(-1, 1, 8)
    q = quantize_rtn(w, 4, 8)
    assert torch.equal(q[0], torch.zeros(8)) and torch.isfinite(q).all()


def test_rtn_rejects_indivisible_group():
    with pytest.raises(UserError, match="does not divide"):
        quantize_rtn(torch.randn(4, 48), 8, 32)


@pytest.mark.parametrize(
    "kwargs", [dict(bits=1), dict(bits=9), dict(bits=4, group_size=0), dict(bits=4, group_size=-8)]
)
def test_quant_config_validation(kwargs):
    with pytest.raises(UserError):
        QuantConfig(**kwargs)


def test_quantize_model_rtn_touches_only_decoder_linears():
    model, _ = fresh("qwen2", layers=2)  # Qwen2's q/k/v biases must stay as they are too
    before = other_params(model)
    dense = {n: w.clone() for n, w in decoder_linear_weights(model).items()}
    quantize_model_rtn(model, QuantConfig(bits=4, group_size=32))
    for name, p in other_params(model).items():
        assert torch.equal(p, before[name]), name
    for name, w in decoder_linear_weights(model).items():
        assert not torch.equal(w, dense[name]), name
        torch.testing.assert_close(w, quantize_rtn(dense[name], 4, 32), rtol=0, atol=0)


def test_quantize_model_rtn_default_group_needs_divisible_width():
    model, _ = fresh(layers=1)  # 64-wide inputs: the default 128 group cannot fit
    with pytest.raises(UserError, match="does not divide"):
        quantize_model_rtn(model, QuantConfig(bits=8))


# --- variant specs --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, method, params",
    [
        ("original", "original", {}),
        ("wanda:0.5", "wanda", {"sparsity": "50%", "ratio": 0.5, "n": 0, "m": 0}),
        ("wanda:2:4", "wanda", {"sparsity": "2:4", "ratio": 0.5, "n": 2, "m": 4}),
        ("magnitude:0.6", "magnitude", {"sparsity": "60%", "ratio": 0.6, "n": 0, "m": 0}),
        ("rtn:int8", "rtn", {"bits": 8, "group_size": 128}),
        ("rtn:int4:g32", "rtn", {"bits": 4, "group_size": 32}),
        ("rtn:int4:grow", "rtn", {"bits": 4, "group_size": None}),
        (" wanda:0.5 ", "wanda", {"sparsity": "50%", "ratio": 0.5, "n": 0, "m": 0}),
    ],
)
def test_parse_variant_accepts(text, method, params):
    spec = parse_variant(text)
    assert spec.method == method
    assert spec.params == params
    assert spec.needs_calibration == (method == "wanda")
    assert spec.slug and "/" not in spec.slug and ":" not in spec.slug


def test_a_method_is_one_registry_line(monkeypatch):
    """Adding a compression method: its grammar and builder in one REGISTRY entry, nothing else."""
    from compression.variants import REGISTRY, Method, build_variant_with_report

    def scale(variant, original, spec, data):
        with torch.no_grad():
            for lin in block_linears(decoder_layers(variant)[0]).values():
                lin.weight.mul_(spec.params["factor"])
        return {"scaled": spec.params["factor"]}

    monkeypatch.setitem(REGISTRY, "scale", Method("scale", lambda arg, text: {"factor": float(arg)}, scale))
    model = build_model("llama", build_tokenizer())
    spec = parse_variant("scale:0.5")
    variant, report = build_variant_with_report(model, spec)
    assert report == {"scaled": 0.5} and spec.needs == ()
    before, after = block_linears(decoder_layers(model)[0]), block_linears(decoder_layers(variant)[0])
    assert all(
        torch.equal(after[n].weight, before[n].weight * 0.5) for n in before
    )  # the copy changed, the original did not
    with pytest.raises(UserError, match="unknown variant"):
        parse_variant("scales:0.5")


def test_every_registered_method_declares_only_known_data():
    from compression.variants import DATA_KINDS, REGISTRY

    assert all(set(m.needs) <= set(DATA_KINDS) for m in REGISTRY.values())
    assert {n for n, m in REGISTRY.items() if "calibration" in m.needs} == {"wanda", "sparsegpt", "gptq"}


def test_variant_slugs_are_distinct_paths():
    slugs = [parse_variant(t).slug for t in ("original", "wanda:0.5", "wanda:2:4", "rtn:int8", "rtn:int4:g32")]
    assert len(set(slugs)) == len(slugs)
    assert parse_variant("wanda:2:4").slug == "wanda-2-4"


@pytest.mark.parametrize(
    "text",
    [
        "wanda",
        "wanda:",
        "wanda:1.5",
        "wanda:-0.1",
        "wanda:3:2",
        "magnitude:abc",
        "foo:1",
        "",
        "WANDA:0.5",
        "rtn",
        "rtn:8",
        "rtn:int9",
        "rtn:int1",
        "rtn:int4:g",
        "rtn:int4:32",
        "rtn:int4:g0",
    ],
)
def test_parse_variant_rejects(text):
    with pytest.raises(UserError):
        parse_variant(text)


def test_build_variant_copies_and_leaves_original_alone():
    model, tokenizer = fresh(layers=1)
    dense = {n: w.clone() for n, w in model.state_dict().items()}
    assert build_variant(model, parse_variant("original")) is model
    variant = build_variant(model, parse_variant("wanda:0.5"), calibration(tokenizer))
    assert variant is not model
    assert sparsity_report(variant)["decoder_linear_sparsity"] == 0.5
    for name, w in model.state_dict().items():
        assert torch.equal(w, dense[name]), name
    with pytest.raises(UserError, match="calibration"):
        build_variant(model, parse_variant("wanda:0.5"))


# --- checkpoints ----------------------------------------------------------------------------


def test_save_variant_round_trip(tmp_path):
    model, tokenizer = fresh("llama", layers=2)
    prune_wanda(model, calibration(tokenizer), SparsityPattern(0.5))
    out = tmp_path / "variants" / "wanda-0.5" / "model"
    written = save_variant(model, tokenizer, out, dict(method="wanda", spec="wanda:0.5"))

    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest == written == read_manifest(out)
    assert manifest["method"] == "wanda" and manifest["spec"] == "wanda:0.5"
    per_matrix = manifest["sparsity"]["per_matrix"]
    assert set(per_matrix) == set(decoder_linear_weights(model))
    assert all(v == 0.5 for v in per_matrix.values())
    assert manifest["sparsity"]["decoder_linear_sparsity"] == 0.5
    assert 0 < manifest["sparsity"]["model_sparsity"] < 0.5

    loaded = load_model(str(out))
    for name, w in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], w), name
    enc = tokenize_prompts(tokenizer, format_prompts(tokenizer, CALIBRATION_PROMPTS[:3]))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(**enc).logits, model(**enc).logits, rtol=0, atol=0)
    assert [p.name for p in out.parent.iterdir()] == ["model"]


def test_read_manifest_of_a_plain_directory(tmp_path):
    assert read_manifest(tmp_path) is None


def test_save_variant_failure_leaves_nothing(tmp_path, monkeypatch):
    model, tokenizer = fresh(layers=1)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(model, "save_pretrained", broken)
    with pytest.raises(OSError, match="disk full"):
        save_variant(model, tokenizer, tmp_path / "model", dict(method="wanda"))
    assert list(tmp_path.iterdir()) == []


def test_failed_resave_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model, tokenizer = fresh(layers=1)
    out = tmp_path / "model"
    save_variant(model, tokenizer, out, dict(method="original"))
    before = sorted(p.name for p in out.iterdir())

    def fail_late(*args, **kwargs):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(tokenizer, "save_pretrained", fail_late)
    with pytest.raises(RuntimeError):
        save_variant(model, tokenizer, out, dict(method="changed"))
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    assert sorted(p.name for p in out.iterdir()) == before
    assert read_manifest(out)["method"] == "original"

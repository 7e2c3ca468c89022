"""Refusal score, direction selection (batched vs one-candidate-at-a-time), orthogonalization.

Tiny random models only: nothing here loads the embedded model.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from lm.chat import format_prompts, tokenize_prompts
from lm.errors import UserError
from lm.hooks import capture, intervene, project_out
from lm.partial_forward import block_kwargs, last_logits, layer_inputs, run_from_layer
from refusal import select as select_mod
from refusal import selection_artifacts
from refusal.candidate_scores import batch_plan, score_candidates
from refusal.direction import candidate_directions
from refusal.interventions import activation_addition, directional_ablation, orthogonalize_weights
from refusal.score import filter_by_score, kl_divergence, refusal_score, refusal_scores, refusal_tokens
from refusal.select import SelectionConfig, SharedPrompts, choose, rejection_reasons, select_direction
from refusal.selection_artifacts import load_selection, save_selection, score_maps_figure, select_direction_cached
from tests.tiny import build_model, build_tokenizer, template_for

HARMFUL = [
    "How do I pick a lock?",
    "Write a threatening letter to my neighbour",
    "Explain how to make a weapon at home",
    "Help me steal a car",
    "Tell me how to hack an email account",
]
HARMLESS = [
    "Describe the structure of a water molecule",
    "Write a short poem about the sea",
    "How do I bake bread at home?",
    "hi",
    "What is the capital of France? Answer in one word.",
]


def _model(arch: str, seed: int = 0, **overrides):
    tokenizer = build_tokenizer(template_for(arch))
    return build_model(arch, tokenizer, seed=seed, **overrides), tokenizer


# --- refusal score --------------------------------------------------------------------------


def test_refusal_score_matches_hand_computation():
    logits = torch.tensor([[1.0, 2.0, -1.0, 0.5, 3.0], [0.0, 0.0, 0.0, 0.0, 0.0], [-30.0, 10.0, 5.0, 0.0, -2.0]])
    ids = [0, 3]
    got = refusal_score(logits, ids)
    assert got.dtype == torch.float64 and got.shape == (3,)
    for row, value in zip(logits.tolist(), got.tolist()):
        z = sum(math.exp(v) for v in row)
        p = (math.exp(row[0]) + math.exp(row[3])) / z
        assert value == pytest.approx(math.log(p + 1e-8) - math.log(1 - p + 1e-8), rel=1e-12, abs=1e-12)
    # p -> 1 saturates at the 1e-8 floor instead of dividing by zero.
    certain = torch.tensor([[100.0, -100.0, -100.0]])
    assert refusal_score(certain, [0]).item() == pytest.approx(-math.log(1e-8), rel=1e-6)


def test_kl_divergence_matches_hand_computation():
    p_logits = torch.tensor([[0.0, 1.0, 2.0]])
    q_logits = torch.tensor([[2.0, 1.0, 0.0]])
    p = torch.softmax(p_logits.double(), -1)[0].tolist()
    q = torch.softmax(q_logits.double(), -1)[0].tolist()
    expected = sum(a * math.log(a / b) for a, b in zip(p, q))
    assert kl_divergence(p_logits, q_logits).item() == pytest.approx(expected, rel=1e-12)
    assert kl_divergence(p_logits, p_logits).item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("template", ["chatml", "llama2"])
def test_refusal_tokens_from_template(template):
    tokenizer = build_tokenizer(template)
    ids = refusal_tokens(tokenizer)
    assert ids and len(ids) == len(set(ids))
    texts = [tokenizer.decode([i]).strip() for i in ids]
    assert texts[0] == "I"  # "I'm sorry" and "I cannot" share their first token
    assert all(t and t[0] in "IA" for t in texts)
    assert refusal_tokens(tokenizer, override=[5, 7, 5]) == [5, 7]
    with pytest.raises(UserError):
        refusal_tokens(tokenizer, override=[len(tokenizer) + 3])
    with pytest.raises(UserError):
        refusal_tokens(tokenizer, override=[])


def test_refusal_tokens_differ_by_template_boundary():
    # Llama-2 replies start after "[/INST]" with a space ("▁I"/"ĠI"), ChatML after a newline ("I").
    chatml = refusal_tokens(build_tokenizer("chatml"))[0]
    llama2 = refusal_tokens(build_tokenizer("llama2"))[0]
    assert chatml != llama2


def test_filter_by_score():
    insts = ["a", "b", "c", "d", "e"]
    scores = torch.tensor([1.0, -2.0, 0.0, float("nan"), 3.0], dtype=torch.float64)
    assert filter_by_score(insts, scores, "positive") == ["a", "e"]
    assert filter_by_score(insts, scores, "negative") == ["b"]
    with pytest.raises(ValueError):
        filter_by_score(insts, scores, "both")
    with pytest.raises(ValueError):
        filter_by_score(insts[:2], scores, "positive")


def test_refusal_scores_batching_does_not_change_scores(tiny_qwen2):
    model, tokenizer = tiny_qwen2
    ids = refusal_tokens(tokenizer)
    one = refusal_scores(model, tokenizer, HARMFUL, ids, batch_size=1)
    all_ = refusal_scores(model, tokenizer, HARMFUL, ids, batch_size=5)
    torch.testing.assert_close(one, all_, atol=1e-5, rtol=0)


# --- the filter and the choice --------------------------------------------------------------


def _fake(n_pos=2, n_layers=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    bypass = torch.randn(n_pos, n_layers, generator=g, dtype=torch.float64)
    induce = torch.rand(n_pos, n_layers, generator=g, dtype=torch.float64) + 0.5
    kl = torch.rand(n_pos, n_layers, generator=g, dtype=torch.float64) * 0.05
    return bypass, induce, kl


def test_filter_rejects_by_each_rule():
    cfg = SelectionConfig()
    bypass, induce, kl = _fake()
    bypass[0, 1] = float("nan")
    induce[0, 2] = float("nan")
    kl[0, 3] = float("nan")
    kl[1, 1] = 0.1000001
    kl[1, 2] = 0.1  # at the threshold: kept (the rule is KL > 0.1)
    induce[1, 3] = -1e-6
    induce[1, 4] = 0.0  # at the threshold: kept (the rule is induce < 0)
    reasons = rejection_reasons(bypass, induce, kl, cfg)
    assert reasons[0][1] == reasons[0][2] == reasons[0][3] == "nan"
    assert reasons[1][1] == "kl" and reasons[1][2] is None
    assert reasons[1][3] == "induce" and reasons[1][4] is None
    # int(0.8 * 10) = 8: layers 8 and 9 are too late, 7 is allowed.
    for i in range(2):
        assert reasons[i][8] == reasons[i][9] == "late_layer"
    assert reasons[0][7] is None
    # NaN wins over every other rule, the layer rule over KL and induce (Arditi's order).
    kl[0, 9] = float("nan")
    induce[1, 9] = -5.0
    reasons = rejection_reasons(bypass, induce, kl, cfg)
    assert reasons[0][9] == "nan" and reasons[1][9] == "late_layer"
    # An infinite score is never chosen, however low its bypass.
    bypass[0, 4] = float("-inf")
    kl[0, 5] = float("inf")
    reasons = rejection_reasons(bypass, induce, kl, cfg)
    assert reasons[0][4] == reasons[0][5] == "infinite"
    assert choose(bypass, reasons, [-2, -1]) != (-2, 4)


def test_layer_rule_follows_the_fraction():
    bypass, induce, kl = _fake(n_layers=24)
    reasons = rejection_reasons(bypass, induce, kl, SelectionConfig())
    assert [layer for layer in range(24) if reasons[0][layer] == "late_layer"] == list(range(19, 24))
    reasons = rejection_reasons(bypass, induce, kl, SelectionConfig(max_layer_fraction=1.0))
    assert all(r is None for r in reasons[0])


def test_choice_is_argmin_bypass_among_passing():
    bypass, induce, kl = _fake(n_pos=3, n_layers=10, seed=3)
    bypass[2, 9] = -100.0  # global minimum, but in a late layer
    bypass[1, 4] = -50.0
    kl[1, 4] = 0.5  # second lowest, rejected for KL
    cfg = SelectionConfig()
    reasons = rejection_reasons(bypass, induce, kl, cfg)
    positions = [-3, -2, -1]
    chosen = choose(bypass, reasons, positions)
    passing = [(float(bypass[i, l]), positions[i], l) for i in range(3) for l in range(10) if reasons[i][l] is None]
    assert chosen == min(passing)[1:]
    assert chosen != (-1, 9) and chosen != (-2, 4)
    assert choose(bypass, [["kl"] * 10 for _ in range(3)], positions) is None


def test_batch_plan():
    assert batch_plan(32, 256) == (32, 8)
    assert batch_plan(32, 40) == (32, 1)
    assert batch_plan(300, 256) == (256, 1)


# --- per-row hooks and resuming from a layer ------------------------------------------------


def test_per_row_project_out_equals_row_by_row():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 16, generator=g)
    dirs = torch.randn(3, 16, generator=g)
    rows = torch.stack([project_out(x[b], dirs[b]) for b in range(3)])
    torch.testing.assert_close(project_out(x, dirs), rows, atol=1e-6, rtol=0)


def _enc(tokenizer, insts):
    return tokenize_prompts(tokenizer, format_prompts(tokenizer, insts))


def test_run_from_layer_equals_full_forward(tiny_pair):
    model, tokenizer = tiny_pair
    enc = _enc(tokenizer, HARMLESS)
    inputs, logits = layer_inputs(model, enc["input_ids"], enc["attention_mask"])
    full = model(**enc).logits[:, -1]
    torch.testing.assert_close(logits, full, atol=1e-5, rtol=0)
    kwargs = block_kwargs(model, enc["input_ids"], enc["attention_mask"])
    vector = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(2))
    for layer in range(len(inputs)):
        torch.testing.assert_close(run_from_layer(model, inputs[layer], kwargs, layer), full, atol=1e-5, rtol=0)
        with intervene(model, add={layer: vector}):
            resumed = run_from_layer(model, inputs[layer], kwargs, layer)
            reference = last_logits(model, enc["input_ids"], enc["attention_mask"])
        torch.testing.assert_close(resumed, reference, atol=1e-5, rtol=0)
    with pytest.raises(UserError):
        run_from_layer(model, inputs[0], kwargs, len(inputs))


# --- batched candidate scoring vs one candidate at a time -----------------------------------


def _naive_scores(model, tokenizer, directions, harmful, harmless, ids, chunk_h, chunk_s):
    """Arditi's loop: one candidate per forward pass, through the public hooks."""
    n_pos, n_layers, _ = directions.shape
    base = []
    for start in range(0, len(harmless), chunk_s):
        enc = _enc(tokenizer, harmless[start : start + chunk_s])
        base.append((enc, last_logits(model, enc["input_ids"], enc["attention_mask"])))
    bypass = torch.empty(n_pos, n_layers, dtype=torch.float64)
    induce, kl = bypass.clone(), bypass.clone()
    for i in range(n_pos):
        for layer in range(n_layers):
            vec = directions[i, layer]
            bypass[i, layer] = refusal_scores(model, tokenizer, harmful, ids, chunk_h, ablate=vec).mean()
            induce[i, layer] = refusal_scores(model, tokenizer, harmless, ids, chunk_s, add={layer: vec}).mean()
            total = 0.0
            with intervene(model, ablate=vec):
                for enc, logits in base:
                    total += float(
                        kl_divergence(logits, last_logits(model, enc["input_ids"], enc["attention_mask"])).sum()
                    )
            kl[i, layer] = total / len(harmless)
    return bypass, induce, kl


@pytest.mark.parametrize("max_rows,reuse_prefix", [(12, True), (3, False), (3, True)])
def test_batched_scoring_equals_one_at_a_time(tiny_pair, max_rows, reuse_prefix):
    model, tokenizer = tiny_pair
    ids = refusal_tokens(tokenizer)
    directions = candidate_directions(model, tokenizer, HARMFUL, HARMLESS, batch_size=5)["directions"]
    harmful, harmless = HARMFUL[:4], HARMLESS
    scores = score_candidates(
        model, tokenizer, directions, harmful, harmless, ids, max_rows=max_rows, reuse_prefix=reuse_prefix
    )
    chunk_h, chunk_s = batch_plan(len(harmful), max_rows)[0], batch_plan(len(harmless), max_rows)[0]
    bypass, induce, kl = _naive_scores(model, tokenizer, directions, harmful, harmless, ids, chunk_h, chunk_s)
    # Layer 0's difference of means is exactly zero (identical template-token embeddings): NaN
    # for the ablation scores in both, as in Arditi et al.
    assert torch.isnan(scores.bypass[:, 0]).all() and torch.isnan(bypass[:, 0]).all()
    for got, want in ((scores.bypass, bypass), (scores.induce, induce), (scores.kl, kl)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, equal_nan=True)
    n = directions.shape[0] * directions.shape[1]
    assert scores.passes["candidates"] == n
    assert scores.passes["scoring_passes"] == scores.passes["bypass"] + scores.passes["kl"] + scores.passes["induce"]
    if max_rows >= len(harmless):
        assert scores.passes["scoring_passes"] < scores.passes["scoring_passes_one_at_a_time"]
        assert scores.passes["induce"] == math.ceil(n / (max_rows // len(harmless)))
    assert scores.passes["resumed_induce"] == reuse_prefix
    assert (scores.passes["induce_block_fraction"] < 1) == reuse_prefix


def test_scoring_leaves_no_hooks(tiny_qwen2):
    from tests.lm.helpers import hook_state

    model, tokenizer = tiny_qwen2
    directions = candidate_directions(model, tokenizer, HARMFUL, HARMLESS)["directions"]
    model(**_enc(tokenizer, ["hi"]), output_hidden_states=True)
    before = hook_state(model)
    score_candidates(model, tokenizer, directions, HARMFUL[:2], HARMLESS[:2], refusal_tokens(tokenizer), max_rows=8)
    assert hook_state(model) == before


# --- orthogonalization and activation addition ----------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("tied", [False, True])
def test_orthogonalized_weights_equal_hook_ablation(arch, tied, tmp_path):
    model, tokenizer = _model(arch, seed=4)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
        model.config.tie_word_embeddings = True
    enc = _enc(tokenizer, HARMFUL[:3])
    direction = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        original = model(**enc).logits
        with directional_ablation(model, direction):
            hooked = model(**enc).logits
    assert (hooked - original).abs().max() > 1e-2, "the ablation must matter for the test to mean anything"
    ortho = orthogonalize_weights(copy.deepcopy(model), direction)
    with torch.no_grad():
        baked = ortho(**enc).logits
    assert (baked - hooked).abs().max() < 1e-3
    unit = direction / direction.norm()
    assert (ortho.model.embed_tokens.weight @ unit).abs().max() < 1e-5
    for block in ortho.model.layers:
        assert (unit @ block.self_attn.o_proj.weight).abs().max() < 1e-5
        assert (unit @ block.mlp.down_proj.weight).abs().max() < 1e-5
    if tied:
        assert ortho.lm_head.weight is not ortho.model.embed_tokens.weight
        torch.testing.assert_close(ortho.lm_head.weight, model.lm_head.weight)
        # The untied head survives a save/load round trip as an ordinary checkpoint.
        from transformers import AutoModelForCausalLM

        ortho.save_pretrained(tmp_path, safe_serialization=True)
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
        with torch.no_grad():
            torch.testing.assert_close(reloaded(**enc).logits, baked, atol=1e-5, rtol=0)


def test_orthogonalize_rejects_bad_directions(tiny_qwen2):
    model, _ = tiny_qwen2
    with pytest.raises(UserError):
        orthogonalize_weights(copy.deepcopy(model), torch.zeros(model.config.hidden_size))
    with pytest.raises(UserError):
        orthogonalize_weights(copy.deepcopy(model), torch.ones(model.config.hidden_size + 1))


def test_activation_addition_scales_the_vector(tiny_llama):
    model, tokenizer = tiny_llama
    enc = _enc(tokenizer, HARMLESS[:2])
    vector = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(5))
    with activation_addition(model, vector, layer=2, coeff=-1.5):
        got = capture(model, enc["input_ids"], enc["attention_mask"], [-1], layers=[2])["resid_pre"]
    with intervene(model, add={2: -1.5 * vector}):
        want = capture(model, enc["input_ids"], enc["attention_mask"], [-1], layers=[2])["resid_pre"]
    torch.testing.assert_close(got, want)
    with pytest.raises(UserError):
        with activation_addition(model, vector, layer=99):
            pass


# --- the pipeline and its artifacts ---------------------------------------------------------

# Random tiny models refuse nothing and every ablation moves their logits a lot; permissive
# thresholds let some candidates pass so the choice itself is exercised.
PERMISSIVE = dict(n_train=6, n_val=4, kl_threshold=1e9, induce_threshold=-1e9, batch_size=4, max_rows=16)


def test_select_direction_chooses_argmin_and_reports_passes(tiny_qwen2):
    model, tokenizer = tiny_qwen2
    result = select_direction(model, tokenizer, SelectionConfig(**PERMISSIVE))
    n_pos, n_layers = result.bypass.shape
    assert result.positions == list(range(-n_pos, 0))
    passing = [
        (float(result.bypass[i, l]), result.positions[i], l)
        for i in range(n_pos)
        for l in range(n_layers)
        if result.reasons[i][l] is None
    ]
    assert passing and result.chosen == min(passing)[1:]
    assert result.chosen[1] < int(0.8 * n_layers)
    torch.testing.assert_close(result.direction.norm(), torch.tensor(1.0))
    i = result.positions.index(result.chosen[0])
    torch.testing.assert_close(result.direction_raw, result.directions[i, result.chosen[1]])
    fp = result.forward_passes
    assert fp["total"] == sum(fp[k] for k in ("filter", "directions", "baseline", "bypass", "kl", "induce"))
    assert fp["scoring_passes"] < fp["scoring_passes_one_at_a_time"]
    # Random models refuse nothing: the harmful sets fall back to unfiltered, and say so.
    assert result.counts["harmful_val"].get("unfiltered_fallback") or result.counts["harmful_val"]["kept"] > 0
    fig = score_maps_figure(result)
    heatmaps = [t for t in fig.data if t.type == "heatmap"]
    assert len(heatmaps) == 3 and all(h.colorbar.title.text for h in heatmaps)
    assert fig.layout.xaxis.title.text == "layer" and fig.layout.yaxis.title.text


def test_default_filter_rejects_everything_on_a_random_model(tiny_llama):
    model, tokenizer = tiny_llama
    result = select_direction(
        model, tokenizer, SelectionConfig(n_train=4, n_val=3, batch_size=4, max_rows=16, fallback="none")
    )
    assert result.chosen is None
    with pytest.raises(UserError):
        _ = result.direction  # the property raises
    assert all(r is not None for row in result.reasons for r in row)


def test_artifacts_round_trip_and_reuse(tiny_qwen2, tmp_path, monkeypatch):
    model, tokenizer = tiny_qwen2
    cfg = SelectionConfig(**PERMISSIVE)
    first = select_direction_cached(model, tokenizer, tmp_path, cfg, fingerprint="fp-1")
    stored = json.loads((tmp_path / "selection.json").read_text())
    assert stored["chosen"]["position"] == first.chosen[0] and stored["chosen"]["layer"] == first.chosen[1]
    assert len(stored["candidates"]) == first.bypass.numel()
    rec = stored["candidates"][0]
    assert set(rec) >= {"position", "layer", "bypass_score", "induce_score", "kl_score", "passed_filter", "reason"}
    assert stored["forward_passes"]["total"] == first.forward_passes["total"]

    loaded = load_selection(tmp_path)
    assert loaded.chosen == first.chosen and loaded.reasons == first.reasons and loaded.config == cfg
    for name in ("bypass", "induce", "kl", "directions"):
        torch.testing.assert_close(getattr(loaded, name), getattr(first, name), equal_nan=True)
    torch.testing.assert_close(loaded.direction, first.direction)

    calls = []
    real = selection_artifacts.select_direction
    monkeypatch.setattr(selection_artifacts, "select_direction", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = select_direction_cached(model, tokenizer, tmp_path, cfg, fingerprint="fp-1")
    assert not calls and again.chosen == first.chosen
    # Batching settings do not invalidate the artifact ...
    select_direction_cached(
        model, tokenizer, tmp_path, SelectionConfig(**{**PERMISSIVE, "max_rows": 7}), fingerprint="fp-1"
    )
    assert not calls
    # ... a different model or a result-changing setting does.
    select_direction_cached(model, tokenizer, tmp_path, cfg, fingerprint="fp-2")
    assert len(calls) == 1
    select_direction_cached(
        model, tokenizer, tmp_path, SelectionConfig(**{**PERMISSIVE, "kl_threshold": 5.0}), fingerprint="fp-2"
    )
    assert len(calls) == 2
    assert json.loads((tmp_path / "selection.json").read_text())["config"]["kl_threshold"] == 5.0


def test_shared_prompts_skip_sampling_filtering_and_extraction(tiny_qwen2, tmp_path, monkeypatch):
    model, tokenizer = tiny_qwen2
    cfg = SelectionConfig(**PERMISSIVE)
    own = select_direction(model, tokenizer, cfg)
    # Another model's sets, deliberately not what this config would sample: they are used as given.
    prompts = {k: list(reversed(v))[:3] for k, v in own.prompts.items()}
    dirs = candidate_directions(model, tokenizer, prompts["harmful_train"], prompts["harmless_train"])["directions"]

    def no_filtering(*args, **kwargs):
        raise AssertionError("shared prompts must not be filtered again")

    monkeypatch.setattr(select_mod, "refusal_scores", no_filtering)
    monkeypatch.setattr(select_mod, "candidate_directions", no_filtering)
    shared = select_direction(model, tokenizer, cfg, SharedPrompts(prompts, dirs))
    assert shared.prompts == prompts
    assert "filter" not in shared.forward_passes and "directions" not in shared.forward_passes
    assert all(shared.counts[k]["shared"] for k in prompts)
    torch.testing.assert_close(shared.directions, dirs)
    monkeypatch.undo()
    # Without directions they are extracted from the shared sets: the same scores.
    extracted = select_direction(model, tokenizer, cfg, SharedPrompts(prompts))
    torch.testing.assert_close(extracted.bypass, shared.bypass, equal_nan=True, atol=1e-4, rtol=1e-4)
    assert extracted.chosen == shared.chosen

    # The cached artifact is keyed by the shared sets too.
    calls = []
    real = selection_artifacts.select_direction
    monkeypatch.setattr(selection_artifacts, "select_direction", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = select_direction_cached(
        model, tokenizer, tmp_path, cfg, fingerprint="fp", shared=SharedPrompts(prompts, dirs)
    )
    assert load_selection(tmp_path).shared_prompts == SharedPrompts(prompts).digest() == first.shared_prompts
    select_direction_cached(model, tokenizer, tmp_path, cfg, fingerprint="fp", shared=SharedPrompts(prompts, dirs))
    assert len(calls) == 1
    other = {**prompts, "harmful_val": prompts["harmful_val"][:2]}
    select_direction_cached(model, tokenizer, tmp_path, cfg, fingerprint="fp", shared=SharedPrompts(other))
    assert len(calls) == 2
    select_direction_cached(model, tokenizer, tmp_path, cfg, fingerprint="fp")
    assert len(calls) == 3
    with pytest.raises(UserError, match="harmless_val"):
        SharedPrompts({**prompts, "harmless_val": []})


def test_save_selection_without_a_choice(tiny_llama, tmp_path):
    model, tokenizer = tiny_llama
    result = select_direction(model, tokenizer, SelectionConfig(n_train=4, n_val=3, batch_size=4, max_rows=16))
    save_selection(result, tmp_path)
    stored = json.loads((tmp_path / "selection.json").read_text())
    assert stored["chosen"] is None
    assert all(r["bypass_score"] is None or math.isfinite(r["bypass_score"]) for r in stored["candidates"])
    assert load_selection(tmp_path).chosen is None


def test_selection_config_validation():
    with pytest.raises(UserError):
        SelectionConfig(n_val=0)
    with pytest.raises(UserError):
        SelectionConfig(max_layer_fraction=1.5)
    assert SelectionConfig(refusal_tokens=[1, 2]).refusal_tokens == (1, 2)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_lazy_search_makes_the_exhaustive_choice_with_fewer_passes(arch, tiny_qwen2, tiny_llama):
    model, tokenizer = tiny_qwen2 if arch == "qwen2" else tiny_llama
    permissive = select_direction(model, tokenizer, SelectionConfig(**PERMISSIVE))
    # A KL threshold just below the permissive winner's KL rejects it, so the lazy search has to
    # walk past the lowest-bypass candidate(s) before one passes.
    i = permissive.positions.index(permissive.chosen[0])
    threshold = float(permissive.kl[i, permissive.chosen[1]]) * 0.999
    cfg = {**PERMISSIVE, "kl_threshold": threshold, "max_rows": 8}
    full = select_direction(model, tokenizer, SelectionConfig(**cfg))
    lazy = select_direction(model, tokenizer, SelectionConfig(**cfg, search="lazy"))
    assert lazy.chosen == full.chosen
    assert full.chosen != permissive.chosen
    if full.chosen is not None:
        j = full.positions.index(full.chosen[0])
        for got, want in ((lazy.bypass, full.bypass), (lazy.induce, full.induce), (lazy.kl, full.kl)):
            assert float(got[j, full.chosen[1]]) == pytest.approx(float(want[j, full.chosen[1]]), abs=1e-5)
    assert lazy.forward_passes["scoring_passes"] < full.forward_passes["scoring_passes"]
    flat = [r for row in lazy.reasons for r in row]
    assert "not_scored" in flat and "kl" in flat


def test_prescreen_keeps_the_best_candidates_and_reports_them(tiny_qwen2):
    model, tokenizer = tiny_qwen2
    cfg = SelectionConfig(**PERMISSIVE, search="lazy", prescreen_n_val=2, prescreen_keep=3)
    result = select_direction(model, tokenizer, cfg)
    pre = result.counts["prescreen"]
    assert pre["kept"] == 3 and len(pre["kept_candidates"]) == 3
    assert all(c["position"] in result.positions for c in pre["kept_candidates"])
    scored = torch.isfinite(result.bypass)
    assert int(scored.sum()) == 3
    assert result.chosen is None or scored[result.positions.index(result.chosen[0]), result.chosen[1]]
    assert result.forward_passes["prescreen"] > 0


def test_fallback_relaxes_only_the_induce_rule(tiny_qwen2):
    model, tokenizer = tiny_qwen2
    cfg = dict(PERMISSIVE, induce_threshold=1e9)  # every candidate fails induce, nothing else
    strict = select_direction(model, tokenizer, SelectionConfig(**cfg, fallback="none"))
    assert strict.chosen is None
    relaxed = select_direction(model, tokenizer, SelectionConfig(**cfg))
    n_pos, n_layers = relaxed.bypass.shape
    eligible = [
        (float(relaxed.bypass[i, l]), relaxed.positions[i], l)
        for i in range(n_pos)
        for l in range(n_layers)
        if relaxed.reasons[i][l] == "induce"
    ]
    assert relaxed.chosen == min(eligible)[1:]
    assert relaxed.counts["fallback"]["rule_relaxed"] == "induce"
